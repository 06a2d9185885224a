"""The Redis adapter against real redis-server instances the suite starts (lab.redis): the
limit down to the floor and back exactly, measured by redis-cli (not dbguard's own client);
a noeviction Redis left alone and said so; CONFIG SET refused by rename-command and by ACL,
reported by name; a password that is used and never shown; a server that is down; the
originals a killed dbguard left, put back by the next one; the server's pid by its socket."""
from __future__ import annotations

import pytest

from dbguard import config
from dbguard.caches.redis import Redis
from dbguard.model import Status
from lab.redis import MiB, RedisServer

pytestmark = [pytest.mark.db, pytest.mark.root]


def adapter(r: RedisServer, tmp_path, *, via: str = "unix", floor: int = 32 * MiB, **kw) -> Redis:
    url = f"unix://{r.socket}" if via == "unix" else r.url
    cfg = config.from_dict({"caches": [{"kind": "redis", "name": "app", "url": url, "floor": floor, **kw}]})
    return Redis(cfg.caches[0], str(tmp_path / "state"))


def test_limit_goes_down_to_the_floor_in_steps_evicting_and_back_exactly(redis_host, tmp_path):
    with RedisServer(maxmemory=128 * MiB) as r:
        r.fill(120 * MiB)
        a = adapter(r, tmp_path, via="tcp")
        s = a.collect()
        assert s.up and s.server_pid == r.pid and (s.limit, s.shrink_step, s.shrink_steps_max) == (128 * MiB, 0, 3)
        seen = []
        for step in (1, 2, 3, 3):
            out = a.set_shrink_step(step)
            assert out.status is Status.DONE, out.detail
            seen.append(r.maxmemory_now())
        assert seen == [96 * MiB, 64 * MiB, 32 * MiB, 32 * MiB]      # 128 -> 32 MiB in 3 equal steps
        assert int(r.info("stats")["evicted_keys"]) > 0
        assert int(r.info("memory")["used_memory"]) <= 32 * MiB
        assert (tmp_path / "state" / "originals-cache-app.json").exists()
        assert a.collect().shrink_step == 3 and a.collect().exhausted
        for step in (2, 1, 0):
            assert a.set_shrink_step(step).status is Status.DONE
        assert r.maxmemory_now() == 128 * MiB
        assert not (tmp_path / "state" / "originals-cache-app.json").exists()


def test_noeviction_is_left_alone_and_said_so(redis_host, tmp_path):
    with RedisServer(maxmemory=64 * MiB, policy="noeviction") as r:
        a = adapter(r, tmp_path)
        s = a.collect()
        assert "noeviction" in s.why_not and s.shrink_steps_max == 0
        out = a.set_shrink_step(1)
        assert out.status is Status.REFUSED and "noeviction" in out.detail
        assert r.maxmemory_now() == 64 * MiB


@pytest.mark.parametrize("conf, words", [
    (["rename-command CONFIG \"\""], "CONFIG is renamed or disabled"),
    (["user dbguard on >s3cret ~* +@all -config"], "ACL SETUSER"),
])
def test_a_redis_refusing_config_set_is_reported_by_name(redis_host, tmp_path, conf, words):
    with RedisServer(maxmemory=64 * MiB, conf=conf) as r:
        pw = tmp_path / "pw"
        pw.write_text("s3cret\n")
        pw.chmod(0o600)
        url = f"redis://dbguard@127.0.0.1:{r.port}" if "ACL" in words else r.url
        auth = {"password_file": str(pw)} if "ACL" in words else {}
        cfg = config.from_dict({"caches": [{"kind": "redis", "name": "app", "url": url, "floor": 16 * MiB, **auth}]})
        a = Redis(cfg.caches[0], str(tmp_path / "state"))
        assert a.collect().up
        out = a.set_shrink_step(1)
        assert out.status is Status.FAILED and "redis app: CONFIG SET refused" in out.detail and words in out.detail
        assert "s3cret" not in out.detail
        s = a.collect()
        assert s.why_not == out.detail and s.exhausted       # reported, not tried every cycle
        assert not (tmp_path / "state" / "originals-cache-app.json").exists()


def test_password_is_used_and_a_wrong_one_is_one_line_without_it(redis_host, tmp_path):
    with RedisServer(maxmemory=64 * MiB, password="right-pw") as r:
        pw = tmp_path / "pw"
        for secret, up in (("right-pw", True), ("wrong-pw", False)):
            pw.write_text(secret + "\n")
            pw.chmod(0o600)
            s = adapter(r, tmp_path, password_file=str(pw)).collect()
            assert s.up is up, s.error
            assert secret not in s.error
        assert "login refused" in s.error and "password_file" in s.error


def test_a_server_that_is_down_is_reported_and_never_raises(redis_host, tmp_path):
    r = RedisServer(maxmemory=64 * MiB).start()
    a = adapter(r, tmp_path)
    assert a.collect().up
    r.stop()
    s = a.collect()
    assert not s.up and "cannot reach the server" in s.error and "\n" not in s.error
    assert a.set_shrink_step(1).status is Status.FAILED


def test_a_new_dbguard_finds_the_originals_a_killed_one_left(redis_host, tmp_path):
    with RedisServer(maxmemory=128 * MiB) as r:
        a = adapter(r, tmp_path)
        assert a.set_shrink_step(2).status is Status.DONE
        del a                                              # killed: nothing put back
        b = adapter(r, tmp_path)
        s = b.collect()
        assert (s.configured, s.shrink_step) == (128 * MiB, 2)
        assert b.recover().status is Status.DONE
        for step in (1, 0):
            assert b.set_shrink_step(step).status is Status.DONE
        assert r.maxmemory_now() == 128 * MiB


def test_a_restarted_server_drops_the_saved_value(redis_host, tmp_path):
    with RedisServer(maxmemory=128 * MiB) as r:
        a = adapter(r, tmp_path)
        assert a.set_shrink_step(1).status is Status.DONE
    with RedisServer(maxmemory=128 * MiB) as r2:     # another server (another run_id) at the same state dir
        b = Redis(config.from_dict({"caches": [{"kind": "redis", "name": "app", "url": f"unix://{r2.socket}",
                                                "floor": 32 * MiB}]}).caches[0], str(tmp_path / "state"))
        s = b.collect()
        assert (s.configured, s.shrink_step) == (128 * MiB, 0)
        assert not (tmp_path / "state" / "originals-cache-app.json").exists()
