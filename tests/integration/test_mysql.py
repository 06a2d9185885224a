"""MySQL/MariaDB adapter against a real MariaDB the suite starts (own datadir, socket, port).

Needs root (the server runs as the `mysql` OS user, dbguard reads /proc of that process)
and the mariadb-server package; without them the tests fail saying so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymysql
import pytest

from dbguard import config
from dbguard.settings import DatabaseConfig
from dbguard.daemon import Daemon
from dbguard.databases.identity import why_not_server
from dbguard.databases.mysql import MySQL
from dbguard.errors import ConfigError
from dbguard.model import Role, Status
from lab.mariadb import MariaDB

MiB = 1024**2
POOL = 160 * MiB
FLOOR = 32 * MiB
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.db


# --- no server ------------------------------------------------------------------------------
def test_unknown_cache_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="shrink_caches: 'query_cache_typo' is not supported"):
        MySQL(DatabaseConfig(kind="mysql", name="m", socket="/x", shrink_caches=("query_cache_typo",)), str(tmp_path))


# --- against a real server -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(mariadb_host):
    with MariaDB(settings={"innodb_buffer_pool_size": "160M", "max_allowed_packet": "64M",
                           "performance_schema": "ON",
                           "performance_schema_instrument": "'memory/%=COUNTED'"}) as db:
        db.sql("CREATE DATABASE w")
        db.sql("CREATE TABLE w.t (id INT PRIMARY KEY AUTO_INCREMENT, pad CHAR(255)) ENGINE=InnoDB")
        db.sql("INSERT INTO w.t (pad) SELECT REPEAT('x', 255) FROM w.seq_1_to_700000")   # more pages than the pool holds
        db.create_user("dbguard", "s3cret", ["PROCESS", "SUPER", "CONNECTION ADMIN"], host="localhost")
        db.create_user("weak", "weak", ["PROCESS"], host="localhost")
        db.create_user("app", "app", [], host="localhost")
        yield db


def _config(db: MariaDB, tmp_path: Path, user="dbguard", password="s3cret", **kw) -> DatabaseConfig:
    pw = tmp_path / f"{user}.password"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    base = dict(kind="mysql", name="orders", socket=db.socket, user=user, password_file=str(pw),
                buffer_pool_floor=FLOOR, shrink_steps=3, connect_timeout=2.0, statement_timeout=2.0)
    return DatabaseConfig(**{**base, **kw})


@pytest.fixture
def guard(server, tmp_path):
    state = tmp_path / "state"
    adapters: list[MySQL] = []

    def make(**kw) -> MySQL:
        a = MySQL(_config(server, tmp_path, **kw), str(state))
        adapters.append(a)
        return a
    yield make
    for a in adapters:
        a.close()
    server.sql("SET GLOBAL innodb_buffer_pool_size = %s", (POOL,))   # next test starts at the DBA's size
    server.sql("SET GLOBAL table_open_cache = 400")


def _pool(db: MariaDB) -> int:
    return int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size"))


def test_stats_read(server, guard):
    app = pymysql.connect(**server.connect_kwargs("app", "app"), autocommit=True)
    try:
        app.cursor().execute("SET @big = REPEAT('x', 30 * 1024 * 1024)")   # a session holding ~30 MiB
        app_id = app.thread_id()
        server.sql("SELECT COUNT(*) FROM w.t WHERE pad LIKE 'y%'")        # pages into the pool
        s = guard().collect()
    finally:
        app.close()
    assert s.up, s.error
    assert s.kind == "mysql" and s.server_pid == server.pid()
    assert s.roles == {server.pid(): Role.MYSQLD}
    assert s.data_directory.rstrip("/") == str(server.datadir)
    assert s.cache_bytes == POOL and s.cache_configured_bytes == POOL
    assert s.shrink_step == 0 and s.shrink_steps_max == 3
    assert 0 < s.cache_used_bytes <= POOL, s
    assert s.cache_used_bytes == s.extra["pages_data"] * 16384
    assert 0 < s.hit_ratio <= 1, s
    assert s.extra["pages_total"] > s.extra["pages_free"] >= 0
    assert s.extra["server_rss_bytes"] > s.cache_used_bytes, s
    assert s.extra["memory_global_total"] > POOL, s
    assert s.extra["resize_mode"] == "session (1 MiB)" and s.extra["missing_grants"] == []
    assert s.extra["auto_shrink_min"] is None
    assert app_id in {x.pid for x in s.sessions}, s.sessions
    app_session = {x.pid: x for x in s.sessions}[app_id]
    assert app_session.kind == "connection" and app_session.user == "app"
    assert app_session.memory_bytes >= 30 * MiB, s.sessions
    assert max(s.sessions, key=lambda x: x.memory_bytes).pid == app_id, s.sessions


def test_server_identity_is_checked_by_fact(server):
    datadir, pid = str(server.datadir), server.pid()

    def why(pid: int, basedir: str = "/usr", peer: int | None = None) -> str:
        return why_not_server(pid, datadir, exe_under=basedir, owner_of_datadir=True, peer_pid=peer)
    assert why(pid, peer=pid) == ""
    assert why(pid) == ""
    assert "socket peer" in why(pid, peer=os.getpid())
    # Some other process (this test) named in a pid file is not the server.
    assert "does not run in the data directory" in why(os.getpid())
    assert "not a server under /opt" in why(pid, "/opt")
    assert "does not exist" in why(2**22 + 7)


def test_shrink_to_floor_in_steps_and_never_below(server, guard, tmp_path):
    g = guard()
    server.sql("SELECT COUNT(*) FROM w.t WHERE pad LIKE 'y%'")
    rss_before = g.collect().extra["server_rss_bytes"]
    sizes = []
    for step in (1, 2, 3):
        out = g.set_shrink_step(step)
        assert out.ok, out.detail
        s = g.collect()
        sizes.append(_pool(server))
        assert s.shrink_step == step and s.cache_bytes == sizes[-1]
        assert s.cache_configured_bytes == POOL            # from the originals file while shrunk
        assert sizes[-1] % MiB == 0
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    assert sizes[-1] == FLOOR
    assert g.originals.load()["innodb_buffer_pool_size"] == POOL
    # The server's memory fell, not only the variable.
    assert g.collect().extra["server_rss_bytes"] < rss_before
    # Asked for more than the floor allows: stays at the floor.
    out = g.set_shrink_step(10)
    assert out.ok, out.detail
    assert _pool(server) == FLOOR


def test_floor_that_is_not_a_resize_unit_is_rounded_up(server, guard):
    g = guard(buffer_pool_floor=50 * MiB + 1)
    assert g.set_shrink_step(3).ok
    assert _pool(server) == 51 * MiB


def test_grow_back_gradually_to_configured_size(server, guard):
    g = guard(shrink_caches=("table_open_cache",))
    assert g.set_shrink_step(3).ok
    assert _pool(server) == FLOOR and int(server.value("SELECT @@table_open_cache")) == 64
    seen = []
    for _ in range(3):                            # the policy's pacing: one step back per call
        s = g.collect()
        promised = s.grow_bytes                   # what the policy weighs before growing
        before = _pool(server)
        out = g.set_shrink_step(s.shrink_step - 1)
        assert out.ok, out.detail
        seen.append(_pool(server))
        assert seen[-1] - before == promised
    assert seen == sorted(seen) and len(set(seen)) == 3
    assert seen[-1] == POOL
    assert int(server.value("SELECT @@table_open_cache")) == 400
    assert g.originals.load() is None
    assert g.collect().shrink_step == 0


def test_originals_survive_a_killed_dbguard(server, guard, tmp_path):
    """A dbguard SIGKILLed with the pool shrunk: the next one puts the DBA's size back."""
    cfg = _config(server, tmp_path)
    state = tmp_path / "state"
    code = (
        "import sys, time\n"
        "from dbguard.settings import DatabaseConfig\n"
        "from dbguard.databases.mysql import MySQL\n"
        f"m = MySQL(DatabaseConfig(**{cfg.__dict__!r}), {str(state)!r})\n"
        "o = m.set_shrink_step(3)\n"
        "print(o.ok, o.detail, flush=True)\n"
        "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("True"), line
    finally:
        p.kill()           # our own child process, not a database
        p.wait()
        p.stdout.close()
    assert _pool(server) == FLOOR
    g = guard()
    s = g.collect()
    assert s.cache_configured_bytes == POOL and s.shrink_step == 3
    out = g.recover()                    # reports what is left shrunk; the caller steps it back
    assert out.carried_out and "left the buffer pool at step 3 of 3" in out.detail, out
    assert _pool(server) == FLOOR
    for step in (2, 1, 0):
        assert g.set_shrink_step(step).ok
    assert _pool(server) == POOL and g.originals.load() is None
    assert g.recover().status is Status.SKIPPED


def test_a_new_dbguard_grows_a_pool_left_shrunk_back_one_step_at_a_time(server, guard, tmp_path, make_cgroup):
    """The daemon at start: recover() says what a killed run left shrunk, the daemon steps it back
    through the executor (one audited restore_cache per step), as at stop."""
    g = guard()
    assert g.set_shrink_step(3).ok and _pool(server) == FLOOR
    g.close()                                   # this dbguard "dies" here: its originals file stays
    cfg = _config(server, tmp_path)
    q = json.dumps
    toml = tmp_path / "dbguard.toml"
    cg = make_cgroup(4096 * MiB)
    toml.write_text("\n".join([
        "[general]", f"state_dir = {q(str(tmp_path / 'state'))}", "lock_memory = false",
        "[[databases]]", 'kind = "mysql"', f"name = {q(cfg.name)}", f"socket = {q(cfg.socket)}",
        f"user = {q(cfg.user)}", f"password_file = {q(cfg.password_file)}", f"buffer_pool_floor = {FLOOR}",
        "shrink_steps = 3", "[pressure]", f"cgroup = {q(str(cg.path))}", "[bpf]", "enabled = false",
        "[metrics]", 'listen = ""', "[audit]", f"path = {q(str(tmp_path / 'audit.jsonl'))}", ""]))
    d = Daemon(config.load(toml))
    try:
        d.open()
        assert _pool(server) == POOL and g.originals.load() is None
    finally:
        d.close()
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    restores = [r for r in audit if r["action"] == "restore_cache"]
    assert "left the buffer pool at step 3 of 3" in restores[0]["result"], restores
    assert [r["value"] for r in restores[1:]] == [2, 1, 0], restores
    assert all(" grow " in r["result"] for r in restores[1:]), restores
    assert all(r["ok"] for r in restores), restores


def test_missing_privilege_is_named(server, guard):
    g = guard(user="weak", password="weak")
    s = g.collect()
    assert s.up, s.error
    assert "resize the buffer pool: SUPER" in s.extra["missing_grants"]
    out = g.set_shrink_step(1)
    assert not out.ok
    assert "dbguard needs SUPER to resize the buffer pool: GRANT SUPER ON *.* TO 'weak'" in out.detail
    assert "\n" not in out.detail
    assert _pool(server) == POOL
    victim = pymysql.connect(**server.connect_kwargs("app", "app"))
    try:
        out = g.terminate(victim.thread_id())
        assert not out.ok
        assert "CONNECTION ADMIN or SUPER to kill other users' statements" in out.detail
    finally:
        victim.close()


def test_server_down_and_bad_password_are_one_line(server, guard, tmp_path):
    g = guard(socket=str(tmp_path / "nothing.sock"))
    s = g.collect()
    assert not s.up and "cannot reach the server" in s.error and "is it running" in s.error
    assert "\n" not in s.error
    out = g.set_shrink_step(1)
    assert not out.ok and "cannot reach the server" in out.detail
    assert not g.cancel(5).ok
    s = guard(password="wrong").collect()
    assert not s.up and "login refused for user 'dbguard'" in s.error and "password_file" in s.error
    os.environ.pop("DBGUARD_TEST_UNSET", None)
    s = guard(password_file="", password_env="DBGUARD_TEST_UNSET").collect()
    assert not s.up and "DBGUARD_TEST_UNSET is not set" in s.error


def test_password_from_environment(server, guard, monkeypatch):
    monkeypatch.setenv("DBGUARD_TEST_MYSQL_PW", "s3cret")
    s = guard(password_file="", password_env="DBGUARD_TEST_MYSQL_PW").collect()
    assert s.up, s.error


def test_restart_picks_up_the_new_pid(server, guard):
    g = guard()
    first = g.collect()
    assert first.server_pid == server.pid()
    old = server.pid()
    server.restart()
    s = g.collect()
    assert s.up, s.error
    assert s.server_pid == server.pid() != old
    assert s.roles == {server.pid(): Role.MYSQLD}


def test_cancel_then_terminate_a_runaway_session(server, guard):
    g = guard()
    app = pymysql.connect(**server.connect_kwargs("app", "app"), autocommit=True)
    result: dict = {}

    def run():
        try:
            with app.cursor() as cur:
                cur.execute("SELECT SLEEP(60)")
                result["sleep"] = cur.fetchone()[0]
        except Exception as e:      # recorded, asserted below
            result["error"] = e
    t = threading.Thread(target=run)
    t.start()
    try:
        app_id = app.thread_id()
        deadline = time.monotonic() + 30
        while not any(x.pid == app_id and x.state == "active" for x in g.collect().sessions):
            assert time.monotonic() < deadline, "the test session never showed up as active"
            time.sleep(0.05)
        mysqld = server.pid()
        out = g.cancel(app_id)
        assert out.ok, out.detail
        t.join(30)
        assert not t.is_alive()
        assert result["error"].args[0] == 1317   # ER_QUERY_INTERRUPTED: the statement, not the session
        assert app_id in {x.pid for x in g.collect().sessions}
        out = g.terminate(app_id)
        assert out.ok, out.detail
        assert app_id not in {x.pid for x in g.collect().sessions}
        assert server.pid() == mysqld and server.running()
        out = g.terminate(app_id)
        assert out.status is Status.GONE and f"connection {app_id} is gone" in out.detail, out
    finally:
        t.join(30)
        app.close()


def test_coexists_with_mariadb_auto_shrink(tmp_path, mariadb_host):
    """innodb_buffer_pool_size_auto_min on: MariaDB may shrink the pool itself; dbguard must
    not raise it back under pressure, and grows it back once asked at level ok."""
    with MariaDB(settings={"innodb_buffer_pool_size": "160M",
                           "innodb_buffer_pool_size_auto_min": "32M"}) as db:
        db.create_user("dbguard", "s3cret", ["PROCESS", "SUPER", "CONNECTION ADMIN"], host="localhost")
        g = MySQL(_config(db, tmp_path), str(tmp_path / "state"))
        try:
            app = db.connect()
            try:   # performance_schema is off here: memory per session from PROCESSLIST.MEMORY_USED
                app.cursor().execute("SET @big = REPEAT('x', 8 * 1024 * 1024)")
                s = g.collect()
                assert {x.pid: x for x in s.sessions}[app.thread_id()].memory_bytes >= 8 * MiB, s.sessions
                assert "memory_global_total" not in s.extra
            finally:
                app.close()
            assert s.extra["auto_shrink_min"] == 32 * MiB
            assert g.collect().self_shrunk_ago is None
            shrunk_at = time.monotonic()
            db.sql("SET GLOBAL innodb_buffer_pool_size = %s", (60 * MiB,))   # as MariaDB's own shrink would
            s = g.collect()
            assert s.cache_configured_bytes == POOL and s.shrink_step == 2
            # A fact for the policy, which holds growing off for a while after it (policy.SELF_SHRINK_HOLDOFF).
            assert s.self_shrunk_ago is not None and 0 <= s.self_shrunk_ago <= time.monotonic() - shrunk_at, s
            assert "auto_shrunk_seconds_ago" not in s.extra and not s.resize_in_progress
            out = g.set_shrink_step(2)                    # already below step 2's 75 MiB: left as is
            assert out.ok and "left as is" in out.detail, out.detail
            assert _pool(db) == 60 * MiB
            assert g.originals.load()["innodb_buffer_pool_size"] == POOL
            for step in (1, 0):                           # asked for a step, the adapter does exactly it
                assert g.set_shrink_step(step).ok
                assert g.collect().shrink_step == step
            assert _pool(db) == POOL and g.originals.load() is None
            assert g.collect().self_shrunk_ago >= s.self_shrunk_ago      # our grows are not the server's shrink
        finally:
            g.close()


def test_server_restarted_while_shrunk_needs_no_growing(server, guard):
    """A restart reads my.cnf again (SET GLOBAL, never SET PERSIST): the originals file just goes."""
    g = guard()
    assert g.set_shrink_step(3).ok and _pool(server) == FLOOR
    server.restart()
    assert _pool(server) == POOL
    s = g.collect()
    assert s.up and s.shrink_step == 0 and s.cache_configured_bytes == POOL
    out = g.recover()
    assert out.carried_out and "step 0" in out.detail, out
    assert g.originals.load() is None


def test_no_shrink_steps_means_nothing_to_shrink(server, guard):
    g = guard(shrink_steps=0)
    s = g.collect()
    assert s.shrink_steps_max == 0
    assert g.set_shrink_step(2).ok
    assert _pool(server) == POOL and g.originals.load() is None


@pytest.mark.parametrize("content", ['{not json', '{"innodb_buffer_pool_size": "134217728"}',
                                     '{"innodb_buffer_pool_size": 134217728, "caches": {"table_open_cache": null}}'])
def test_damaged_state_file_is_moved_aside_and_protection_goes_on(server, guard, caplog, content):
    """A damaged or hand-edited file is moved aside with one warning; shrinking still works."""
    g = guard()
    g.originals.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    g.originals.path.write_text(content)
    with caplog.at_level("WARNING", logger="dbguard"):
        s = g.collect()
        assert g.recover().ok                    # nothing left to restore once it is aside
    assert s.up and s.shrink_step == 0 and "state_error" not in s.extra, s
    aside = sorted(g.originals.path.parent.glob("originals-orders.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == content
    warnings = [r.getMessage() for r in caplog.records if "damaged state file" in r.getMessage()]
    assert len(warnings) == 1 and "innodb_buffer_pool_size" in warnings[0], caplog.text
    out = g.set_shrink_step(1)
    assert out.ok, out.detail
    assert _pool(server) < POOL and g.originals.load()["innodb_buffer_pool_size"] == POOL


def test_server_that_does_not_answer_is_reported_down(tmp_path):
    """A listener that accepts and never speaks (a hung server, a silent network)."""
    import socket as sk
    silent = sk.socket(sk.AF_INET, sk.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        cfg = DatabaseConfig(kind="mysql", name="hung", host="127.0.0.1", port=silent.getsockname()[1],
                             user="dbguard", connect_timeout=0.5, statement_timeout=0.5)
        g = MySQL(cfg, str(tmp_path))
        s = g.collect()
        assert not s.up and "cannot reach the server at 127.0.0.1" in s.error, s.error
        out = g.set_shrink_step(1)
        assert not out.ok and "cannot reach the server" in out.detail
        g.close()
    finally:
        silent.close()


def test_identified_by_fact_when_the_login_is_refused(server, guard):
    """No SQL (the user does not exist): mariadbd is still found from the socket it listens on,
    over the unix socket and over TCP; the oracle is the server's own pid file."""
    for kw in ({}, {"socket": "", "host": "127.0.0.1", "port": server.port}):
        s = guard(user="nosuchuser", password="x", **kw).collect()
        assert not s.up and "login refused" in s.error, s.error
        assert s.server_pid == server.pid(), s.identity
        assert s.identity.startswith("listening socket of"), s.identity
        assert os.path.samefile(s.data_directory, server.datadir)
        assert s.roles == {server.pid(): Role.MYSQLD}


def test_discovered_without_a_config(server):
    from dbguard.databases.mysql.discover import discover_mysql
    mine = [d for d in discover_mysql() if d.socket == server.socket]
    assert len(mine) == 1 and mine[0].kind == "mysql" and mine[0].name == f"mysql:{server.datadir}"
