"""Application caches and poolers: their config, the Redis facts read from INFO, the step
ladder, when the policy shrinks and grows them, and the shield of a cache server. Pure."""
from __future__ import annotations

import dataclasses
import os

import pytest

from dbguard import config
from dbguard.caches.endpoint import BadUrl, host_port, listener_pid, redis_url
from dbguard.caches.redis import cannot_evict, expiring_keys, parse_info, refusal, to_stats
from dbguard.caches.resp import RespError
from dbguard.errors import ConfigError
from dbguard.model import ActionKind, CacheStats, Role
from test_policy import policy, proc, reading, snapshot

MiB = 1024 * 1024

INFO = """# Server\r
redis_version:7.0.15\r
process_id:4242\r
run_id:abc\r
# Memory\r
used_memory:250000000\r
used_memory_rss:270000000\r
maxmemory:268435456\r
maxmemory_policy:allkeys-lru\r
# Stats\r
evicted_keys:17\r
keyspace_hits:90\r
keyspace_misses:10\r
# Keyspace\r
db0:keys=100,expires=0,avg_ttl=0\r
db3:keys=10,expires=4,avg_ttl=10\r
"""


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"caches": [{"kind": "redis", "url": "redis://:s3cret@127.0.0.1"}]}, "caches[0].url: holds a password"),
    ({"caches": [{"kind": "redis", "url": "redis://u:s3cret@h:1"}]}, "caches[0].url: holds a password"),
    ({"caches": [{"kind": "redis", "url": "redis://h?password=s3cret"}]}, "caches[0].url: holds a password"),
    ({"caches": [{"kind": "redis", "url": "rediss://h"}]}, "caches[0].url: TLS (rediss://) is not supported"),
    ({"caches": [{"kind": "redis", "url": "redis://h:70000"}]}, "caches[0].url: not a url"),
    ({"caches": [{"kind": "redis"}]}, "caches[0].url: set where the redis server listens"),
    ({"caches": [{"kind": "mongodb", "url": "x"}]}, "caches[0].kind: must be one of redis, memcached"),
    ({"caches": [{"kind": "memcached", "url": "h:1", "password_file": "/x"}]},
     "caches[0].password_file: not a memcached setting"),
    ({"caches": [{"kind": "redis", "url": "redis://h", "password_file": "/p", "password_env": "P"}]},
     "caches[0]: set password_file or password_env, not both"),
    ({"caches": [{"kind": "redis", "url": "redis://h", "floor": "lots"}]}, "caches[0].floor: expected a size"),
    ({"caches": [{"kind": "redis", "url": "redis://h", "flor": 1}]}, "caches[0].flor: unknown key (did you mean floor?)"),
    ({"caches": [{"kind": "redis", "url": "redis://h"}, {"kind": "redis", "url": "redis://H:6379"}]},
     "caches[1]: the same server as caches[0]"),
    ({"caches": [{"kind": "redis", "url": "redis://h", "name": "a"}, {"kind": "memcached", "url": "h", "name": "a"}]},
     "caches[1].name: 'a' is also the name of caches[0]"),
    ({"caches": {"kind": "redis"}}, "caches: expected [[caches]] tables"),
    ({"poolers": [{"kind": "pgbouncer"}]}, "poolers[0].dsn: set the admin console's DSN"),
    ({"poolers": [{"kind": "pgbouncer", "dsn": "dbname=pgbouncer password=s3cret"}]}, "poolers[0].dsn: holds a password"),
    ({"poolers": [{"kind": "pgbouncer", "dsn": "dbname=app"}]}, "poolers[0].dsn: dbname must be pgbouncer"),
    ({"poolers": [{"kind": "redis", "url": "redis://h"}]}, "poolers[0].kind: must be one of pgbouncer"),
    ({"poolers": [{"kind": "pgbouncer", "dsn": "dbname=pgbouncer", "pool_floor": 0}]},
     "poolers[0].pool_floor: must be between 1"),
    ({"policy": {"caches_from": "soon"}}, "policy.caches_from: must be one of warn, high, critical, never"),
])
def test_bad_cache_and_pooler_tables_are_one_line_naming_the_key_never_the_secret(data, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert "s3cret" not in text


def test_good_tables_load_with_names_and_sizes():
    cfg = config.from_dict({"caches": [{"kind": "redis", "url": "unix:///run/redis.sock", "floor": "32MiB"},
                                       {"kind": "memcached", "url": "127.0.0.1:11211", "name": "mc"}],
                            "poolers": [{"kind": "pgbouncer", "dsn": "host=/tmp port=6432 dbname=pgbouncer"}],
                            "policy": {"caches_from": "high"}})
    assert [c.name for c in cfg.caches] == ["redis0", "mc"] and cfg.caches[0].floor == 32 * MiB
    assert cfg.poolers[0].name == "pgbouncer0" and cfg.policy.caches_from == "high"


def test_cache_password_is_read_from_env_or_file_only_when_asked(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    c = config.from_dict({"caches": [{"kind": "redis", "url": "redis://h", "password_file": str(pw)}]}).caches[0]
    assert c.password() == "s3cret" and "s3cret" not in repr(c)
    c = config.from_dict({"caches": [{"kind": "redis", "url": "redis://h", "password_env": "DBG_T_PW"}]}).caches[0]
    monkeypatch.delenv("DBG_T_PW", raising=False)
    with pytest.raises(ConfigError, match="caches.redis0.password_env: environment variable DBG_T_PW is not set"):
        c.password()


# --- endpoints -----------------------------------------------------------------------------------
def test_urls_parse_to_endpoints():
    assert str(redis_url("redis://127.0.0.1")) == "127.0.0.1:6379"
    e = redis_url("redis://app@[::1]:7000/2")
    assert (e.host, e.port, e.user) == ("::1", 7000, "app")
    assert redis_url("unix:///run/redis/r.sock").path == "/run/redis/r.sock"
    assert host_port("10.0.0.1").port == 11211 and host_port("[::1]:5").port == 5
    assert host_port("/run/memcached.sock").kind == "unix"
    for bad in ("unix://relative", "redis:///x", "redis://h/../x?a=1"):
        with pytest.raises(BadUrl):
            redis_url(bad)


def test_the_listener_is_found_by_its_socket_inode(tmp_path):
    """A fixture /proc: the process holding the listening socket's inode owns the port."""
    (tmp_path / "net").mkdir()
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "net" / "tcp").write_text(
        head + "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 777 1\n"
             "   1: 0100007F:18EB 0100007F:9C40 01 00000000:00000000 00:00000000 00000000   100        0 888 1\n")
    (tmp_path / "net" / "tcp6").write_text(head)
    (tmp_path / "net" / "unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 555 /run/r.sock\n")
    for pid, link in ((10, "socket:[888]"), (20, "socket:[777]"), (30, "socket:[555]")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        os.symlink(link, tmp_path / str(pid) / "fd" / "3")
    assert listener_pid(redis_url("redis://127.0.0.1:6379"), root=str(tmp_path)) == 20
    assert listener_pid(redis_url("redis://127.0.0.1:6379"), hint=10, root=str(tmp_path)) == 20
    assert listener_pid(redis_url("redis://127.0.0.1:6380"), root=str(tmp_path)) is None
    assert listener_pid(redis_url("unix:///run/r.sock"), root=str(tmp_path)) == 30


# --- Redis facts -----------------------------------------------------------------------------------
def test_info_facts_and_the_step_ladder():
    info = parse_info(INFO)
    assert info["maxmemory_policy"] == "allkeys-lru" and expiring_keys(info) == 4
    s = to_stats("app", info, None, 64 * MiB, 3, 4242, "")
    assert (s.limit, s.configured, s.shrink_step, s.shrink_steps_max, s.why_not) == (256 * MiB, 256 * MiB, 0, 3, "")
    assert s.evictions == 17 and s.hit_ratio == 0.9 and s.memory == 250000000
    # lowered by dbguard to step 2 of 3: 256 -> 192 -> 128 -> 64 MiB (an oracle by hand)
    lowered = parse_info(INFO.replace("maxmemory:268435456", f"maxmemory:{128 * MiB}"))
    s = to_stats("app", lowered, {"maxmemory": 256 * MiB, "server": "abc"}, 64 * MiB, 3, 4242, "")
    assert (s.shrink_step, s.configured, s.grow_bytes) == (2, 256 * MiB, 64 * MiB)
    assert not s.exhausted
    floor = parse_info(INFO.replace("maxmemory:268435456", f"maxmemory:{64 * MiB}"))
    assert to_stats("app", floor, {"maxmemory": 256 * MiB, "server": "abc"}, 64 * MiB, 3, 1, "").exhausted


def test_a_cache_that_cannot_evict_says_why():
    info = parse_info(INFO)
    assert "noeviction" in cannot_evict({**info, "maxmemory_policy": "noeviction"}, 256 * MiB)
    assert cannot_evict({**info, "maxmemory_policy": "volatile-lru"}, 256 * MiB) == ""
    no_ttl = {k: v for k, v in info.items() if k != "db3"}
    assert "no key has an expiry" in cannot_evict({**no_ttl, "maxmemory_policy": "volatile-ttl"}, 256 * MiB)
    assert "maxmemory is 0" in cannot_evict(info, 0)
    s = to_stats("app", {**info, "maxmemory_policy": "noeviction"}, None, 64 * MiB, 3, 1, "")
    assert s.shrink_steps_max == 0 and s.exhausted
    assert "CONFIG is renamed" in refusal("app", RespError("ERR unknown command 'CONFIG', with args beginning with: "))
    assert "ACL SETUSER" in refusal("app", RespError("NOPERM User dbguard has no permissions to run the 'config|set' command"))


# --- the policy ------------------------------------------------------------------------------------
def cache(step: int = 0, steps: int = 3, *, why_not: str = "", up: bool = True, pooler: bool = False,
          pid: int | None = 600, grow: int = 0, held: str = "") -> CacheStats:
    return CacheStats(name="pgb" if pooler else "app", kind="pgbouncer" if pooler else "redis", up=up,
                      pooler=pooler, server_pid=None if pooler else pid, shrink_step=step, shrink_steps_max=steps,
                      why_not=why_not, limit=256 * MiB, configured=256 * MiB, grow_bytes=grow, held=held)


def snap_with(ts, used, caches, procs=(), roles=None):
    return dataclasses.replace(snapshot(ts, reading(used), list(procs), roles=roles), caches=tuple(caches))


def cache_actions(plan):
    return [(a.kind.value, a.cache, a.value) for a in plan.actions if a.cache is not None]


def test_caches_shrink_at_warn_one_step_per_dwell_and_grow_back_after():
    d = policy()
    plan = d.decide(snap_with(0, 850, [cache(0)]))
    assert cache_actions(plan) == [("shrink_cache", "app", 1)]
    assert cache_actions(d.decide(snap_with(1, 850, [cache(1)]))) == []          # dwell
    assert cache_actions(d.decide(snap_with(6, 850, [cache(1)]))) == [("shrink_cache", "app", 2)]
    assert cache_actions(d.decide(snap_with(12, 850, [cache(3)]))) == []         # at the floor
    for t in range(13, 40):
        plan = d.decide(snap_with(t, 300, [cache(3)]))
        if cache_actions(plan):
            break
    assert cache_actions(plan) == [("grow_cache", "app", 2)]


def test_a_kill_in_the_same_plan_is_not_kept_waiting_behind_a_cache_round_trip():
    # A cache step gives memory back over time; a kill at once. Carried out in plan order.
    d = policy()
    plan = d.decide(snap_with(0, 950, [cache(0)], [proc(10, 200)]))
    kinds = [a.kind for a in plan.actions if a.kind is not ActionKind.SET_OOM_SCORE_ADJ]
    assert kinds == [ActionKind.KILL, ActionKind.SHRINK_CACHE], kinds


def test_caches_from_moves_the_answer_to_a_later_level_or_never():
    assert cache_actions(policy(policy={"caches_from": "high"}).decide(snap_with(0, 850, [cache(0)]))) == []
    assert cache_actions(policy(policy={"caches_from": "high"}).decide(snap_with(0, 920, [cache(0)]))) != []
    assert cache_actions(policy(policy={"caches_from": "never"}).decide(snap_with(0, 990, [cache(0)]))) == []


def test_a_cache_that_cannot_give_memory_back_is_left_alone_and_said_so():
    plan = policy().decide(snap_with(0, 850, [cache(0, 0, why_not="maxmemory-policy is noeviction")]))
    assert cache_actions(plan) == []
    assert ("redis app", "maxmemory-policy is noeviction") in plan.deferred
    assert cache_actions(policy().decide(snap_with(0, 850, [cache(0, up=False)]))) == []


def test_no_grow_that_would_bring_the_warn_level_back():
    d = policy()
    d.decide(snap_with(0, 850, [cache(0)]))
    for t in range(1, 40):
        plan = d.decide(snap_with(t, 700, [cache(1, grow=100 * MiB)]))
        assert cache_actions(plan) == []
    assert any("held at step 1" in why for _, why in plan.deferred)


def test_a_pooler_answers_only_pressure_from_the_database_sessions():
    from dbguard.model import DbSession, DbStats
    busy = DbStats(name="main", kind="postgresql", up=True, server_pid=500, sessions=tuple(
        DbSession(pid=600 + i, kind="client backend", state="active", memory_bytes=100 * MiB) for i in range(5)))
    hog = proc(10, 200)
    d = policy()
    assert cache_actions(d.decide(snap_with(0, 850, [cache(pooler=True)], [hog]))) == []
    plan = d.decide(dataclasses.replace(snap_with(1, 850, [cache(pooler=True)], [hog]), databases=(busy,)))
    assert cache_actions(plan) == [("shrink_cache", "pgb", 1)]
    # the next step waits while the last one still takes effect, and is said so; growing back never waits for it
    wait = "the last step is still taking effect"
    plan = d.decide(dataclasses.replace(snap_with(9, 950, [cache(1, pooler=True, held=wait)], [hog]), databases=(busy,)))
    assert cache_actions(plan) == [] and ("pgbouncer pgb", wait) in plan.deferred
    assert cache_actions(d.decide(snap_with(30, 500, [cache(1, pooler=True, held=wait)]))) == [("grow_cache", "pgb", 0)]


def test_a_cache_server_is_shielded_while_it_can_give_back_and_a_candidate_only_at_critical_after():
    redis = proc(600, 400, comm="redis-server", exe="/usr/bin/redis-server")
    roles = {600: Role.CACHE_SERVER}
    for used, c in ((850, cache(0)), (950, cache(2)), (990, cache(2)), (950, cache(3)),
                    (950, cache(0, 0, why_not="noeviction")), (950, cache(0, up=False))):
        d = policy()
        s = snap_with(0, used, [c], [redis], roles)
        plan = d.decide(s)
        v = d.policy.verdicts(s)[600]
        assert v.protected and not v.candidate and not any(a.kind is ActionKind.KILL for a in plan.actions), (used, c)
    d = policy()
    s = snap_with(0, 990, [cache(3)], [redis], roles)
    plan = d.decide(s)
    v = d.policy.verdicts(s)[600]
    assert v.candidate and not v.protected and d.policy.candidates(s)[0].pid == 600
    assert any(a.kind is ActionKind.KILL and a.pid == 600 for a in plan.actions)
    assert 600 not in d.policy.kernel_view(snap_with(0, 850, [cache(1)], [redis], roles)).candidates


def test_memcached_stats_and_steps():
    from dbguard.caches.memcached import stats_of, to_stats as mc_stats
    st = stats_of(["STAT pid 77", f"STAT limit_maxbytes {96 * MiB}", "STAT bytes 1000", "STAT evictions 5",
                   "STAT get_hits 3", "STAT get_misses 1"])
    slabs = stats_of(["STAT 25:total_pages 100", f"STAT total_malloced {100 * MiB}"])
    s = mc_stats("mc", st, {"evictions": "on", "slab_reassign": "yes"}, slabs, {"limit_maxbytes": 128 * MiB},
                 32 * MiB, 3, 77)
    assert (s.limit, s.configured, s.shrink_step, s.shrink_steps_max, s.grow_bytes) == \
        (96 * MiB, 128 * MiB, 1, 3, 32 * MiB)
    assert s.memory == 100 * MiB and s.extra["item_bytes"] == 1000     # held from the kernel, not in items
    assert s.hit_ratio == 0.75 and s.evictions == 5 and not s.why_not
    s = mc_stats("mc", st, {"evictions": "off"}, slabs, None, 32 * MiB, 3, 77)
    assert "-M" in s.why_not and s.shrink_steps_max == 0 and s.exhausted
    s = mc_stats("mc", st, {"evictions": "on", "slab_reassign": "no"}, slabs, None, 32 * MiB, 3, 77)
    assert "slab_reassign" in s.why_not and s.shrink_steps_max == 0 and s.exhausted


def test_pgbouncer_pool_ladder_and_stats():
    from dbguard.caches.pgbouncer import targets, to_stats as pgb_stats
    saved = {"default_pool_size": 20, "max_db_connections": 0}
    assert [targets(saved, 2, 3, s) for s in (0, 1, 2, 3)] == [
        {"default_pool_size": 20}, {"default_pool_size": 14}, {"default_pool_size": 8}, {"default_pool_size": 2}]
    assert targets({"default_pool_size": 8, "max_db_connections": 12}, 2, 3, 3) == {"default_pool_size": 2}
    pools = [{"database": "app", "sv_active": 3, "sv_idle": 1, "sv_used": 0, "cl_waiting": 5},
             {"database": "pgbouncer", "sv_active": 0, "cl_waiting": 0}]
    s = pgb_stats("pgb", {"default_pool_size": "8", "max_db_connections": "0"}, pools, {"app": 8}, saved, 2, 3, 99)
    assert (s.limit, s.configured, s.shrink_step, s.shrink_steps_max, s.memory) == (8, 20, 2, 3, 4)
    assert s.pooler and s.unit == "connections" and s.extra["clients_waiting"] == 5 and s.held == ""


def test_pgbouncer_next_step_waits_for_the_last_and_for_clients_near_their_timeout():
    from dbguard.caches.pgbouncer import held
    config = {"default_pool_size": "4", "query_wait_timeout": "120"}

    def pool(**kw):
        return {"database": "app", "sv_active": 0, "sv_idle": 0, "sv_used": 0, "sv_tested": 0, "sv_login": 0,
                "cl_waiting": 0, "maxwait": 0, "maxwait_us": 0, **kw}
    assert held(config, [pool(sv_active=4, cl_waiting=6, maxwait=2)], {"app": 4}) == ""
    assert "still taking effect: 6 server connections for a pool of 4 in app" in \
        held(config, [pool(sv_active=5, sv_used=1)], {"app": 4})
    assert "logging in" in held(config, [pool(sv_active=2, sv_login=1)], {"app": 4})
    assert "waited 30.5 s" in held(config, [pool(sv_active=4, maxwait=30, maxwait_us=500_000)], {"app": 4})
    assert held({**config, "query_wait_timeout": "0"}, [pool(sv_active=4, maxwait=300)], {"app": 4}) == ""
    # the console's own pool and a database with no pool size of its own are not counted
    assert held(config, [{"database": "pgbouncer", "sv_active": 9}], {"pgbouncer": 2}) == ""


def test_explain_names_a_cache_down_without_a_pid_it_does_not_know():
    from dbguard.explain import _cache_line
    down = CacheStats(name="app", kind="redis", up=False, error="redis app: connection refused; check url")
    assert _cache_line(down) == "cache app (redis): DOWN (redis app: connection refused; check url)"
    up = cache(1, pid=None)
    assert "server pid not found;" in _cache_line(up) and "None" not in _cache_line(up)
    assert "up; server pid 600; used 0 MiB" in _cache_line(cache(1))
