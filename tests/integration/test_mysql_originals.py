"""The DBA's MariaDB settings survive dbguard: keyed by the server, never written over.

Real throwaway MariaDB servers (lab.mariadb). Expected values are read by the test's own root
connection (SELECT @@GLOBAL...), never through dbguard's code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pymysql
import pytest

from dbguard import config
from dbguard.settings import DatabaseConfig
from dbguard.daemon import Daemon
from dbguard.databases.mysql import MySQL
from lab.mariadb import MariaDB

pytestmark = pytest.mark.db

MiB = 1024**2
POOL = 160 * MiB
FLOOR = 32 * MiB


def _config(db: MariaDB, tmp_path: Path, **kw) -> DatabaseConfig:
    pw = tmp_path / "dbguard.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    base = dict(kind="mysql", name="orders", socket=db.socket, user="dbguard", password_file=str(pw),
                buffer_pool_floor=FLOOR, shrink_steps=4, connect_timeout=2.0, statement_timeout=5.0)
    return DatabaseConfig(**{**base, **kw})


def _server(**settings) -> MariaDB:
    db = MariaDB(settings={"innodb_buffer_pool_size": "160M", "table_open_cache": 400, **settings}).__enter__()
    db.create_user("dbguard", "s3cret", ["PROCESS", "SUPER", "CONNECTION ADMIN"], host="localhost")
    return db


@pytest.fixture(scope="module")
def server(mariadb_host):
    db = _server()
    try:
        yield db
    finally:
        db.destroy()


def pool(db: MariaDB) -> int:
    return int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size"))


@pytest.fixture
def reset(server):
    yield
    server.sql("SET GLOBAL innodb_buffer_pool_size = %s", (POOL,))
    server.sql("SET GLOBAL table_open_cache = 400")
    server.sql("SET GLOBAL max_session_mem_used = DEFAULT")


def test_set_global_by_the_dba_during_a_shrink_survives_grow_and_restore(server, reset, tmp_path, caplog):
    g = MySQL(_config(server, tmp_path, shrink_caches=("table_open_cache",)), str(tmp_path / "state"))
    try:
        assert g.set_shrink_step(3).ok
        shrunk = pool(server)
        assert shrunk < POOL and int(server.value("SELECT @@GLOBAL.table_open_cache")) == 64
        state = g.originals.load()
        assert state["set"] == {"innodb_buffer_pool_size": shrunk, "table_open_cache": 64,
                                "max_session_mem_used": 64 * MiB}, state

        # The DBA, while shrunk: a pool size of their own, and table_open_cache back up.
        server.sql("SET GLOBAL innodb_buffer_pool_size = %s", (96 * MiB,))
        server.sql("SET GLOBAL table_open_cache = 300")

        with caplog.at_level(logging.WARNING, logger="dbguard"):
            out = g.set_shrink_step(2)            # a grow step
        assert out.ok, out.detail
        assert "innodb_buffer_pool_size was changed by someone else" in out.detail, out.detail
        assert "table_open_cache was changed by someone else" in out.detail and "\n" not in out.detail
        assert len([r for r in caplog.records if "changed by someone else" in r.getMessage()]) == 2
        assert pool(server) == 96 * MiB and int(server.value("SELECT @@GLOBAL.table_open_cache")) == 300

        # Nothing left to grow: the policy sees step 0 at the DBA's size, and a restore changes nothing.
        s = g.collect()
        assert s.shrink_step == 0 and s.cache_configured_bytes == 96 * MiB, s
        assert g.originals.load() is None
        assert g.set_shrink_step(0).ok
        assert pool(server) == 96 * MiB and int(server.value("SELECT @@GLOBAL.table_open_cache")) == 300
    finally:
        g.close()


def test_without_anyone_else_the_dba_size_comes_back(server, reset, tmp_path):
    """The same path when nobody else set anything: every step is dbguard's, the DBA's size returns."""
    g = MySQL(_config(server, tmp_path, shrink_caches=("table_open_cache",)), str(tmp_path / "state"))
    try:
        for step in (3, 2, 1, 0):
            out = g.set_shrink_step(step)
            assert out.ok and "someone else" not in out.detail, out.detail
        assert pool(server) == POOL and int(server.value("SELECT @@GLOBAL.table_open_cache")) == 400
        assert g.originals.load() is None
    finally:
        g.close()


def test_a_dba_change_after_dbguard_died_is_kept_and_audited_at_the_next_start(server, reset, tmp_path, make_cgroup):
    g = MySQL(_config(server, tmp_path), str(tmp_path / "state"))
    assert g.set_shrink_step(4).ok and pool(server) == FLOOR
    g.close()                                      # dbguard dies with the pool shrunk
    server.sql("SET GLOBAL innodb_buffer_pool_size = %s", (64 * MiB,))
    cfg = _config(server, tmp_path)
    q = json.dumps
    cg = make_cgroup(4096 * MiB)
    toml = tmp_path / "dbguard.toml"
    toml.write_text("\n".join([
        "[general]", f"state_dir = {q(str(tmp_path / 'state'))}", "lock_memory = false",
        "[[databases]]", 'kind = "mysql"', f"name = {q(cfg.name)}", f"socket = {q(cfg.socket)}",
        f"user = {q(cfg.user)}", f"password_file = {q(cfg.password_file)}", f"buffer_pool_floor = {FLOOR}",
        "shrink_steps = 4", "[pressure]", f"cgroup = {q(str(cg.path))}", "[bpf]", "enabled = false",
        "[metrics]", 'listen = ""', "[audit]", f"path = {q(str(tmp_path / 'audit.jsonl'))}", ""]))
    d = Daemon(config.load(toml))
    try:
        d.open()
        assert pool(server) == 64 * MiB, "the DBA's SET GLOBAL is kept"
        assert not list((tmp_path / "state").glob("originals-*.json"))
    finally:
        d.close()
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    said = [r for r in audit if r["action"] == "restore_cache" and "changed by someone else" in r["result"]]
    assert len(said) == 1 and said[0]["ok"], [r for r in audit if r["action"] == "restore_cache"]
    assert pool(server) == 64 * MiB


def test_a_state_file_of_another_server_is_never_applied(server, reset, tmp_path, caplog):
    """Two servers under one config name, one after another: the first's originals stay off the second."""
    other = _server(innodb_buffer_pool_size="96M")
    try:
        first = MySQL(_config(other, tmp_path), str(tmp_path / "state"))
        assert first.set_shrink_step(4).ok and pool(other) == FLOOR
        first_identity = first.originals.load()["identity"]
        first.close()
    finally:
        other.destroy()

    server.sql("SET GLOBAL innodb_buffer_pool_size = %s", (128 * MiB,))    # the second server's DBA size
    second = MySQL(_config(server, tmp_path), str(tmp_path / "state"))
    try:
        with caplog.at_level(logging.WARNING, logger="dbguard"):
            s = second.collect()
            out = second.recover()
        assert s.up and s.shrink_step == 0 and s.cache_configured_bytes == 128 * MiB, s
        assert pool(server) == 128 * MiB
        assert out.ok, out.detail
        warned = [r.getMessage() for r in caplog.records if "another server" in r.getMessage()]
        assert len(warned) == 1 and "never applied" in warned[0], warned
        assert len(list((tmp_path / "state").glob("originals-orders.json.other-server-*"))) == 1
        assert second.set_shrink_step(1).ok
        assert second.originals.load()["identity"] != first_identity
        assert second.originals.load()["innodb_buffer_pool_size"] == 128 * MiB
        assert second.set_shrink_step(0).ok and pool(server) == 128 * MiB
    finally:
        second.close()


def test_new_sessions_are_capped_while_shrunk_and_the_dbas_cap_comes_back(server, reset, tmp_path):
    """session_memory_cap (64 MiB by default) for sessions that start while shrunk; the DBA's
    own max_session_mem_used (1 GiB here) back at step 0, read by the test's own SQL."""
    server.sql("SET GLOBAL max_session_mem_used = %s", (1024 * MiB,))
    before = server.connect()                        # a session open before the shrink
    g = MySQL(_config(server, tmp_path), str(tmp_path / "state"))
    try:
        assert g.set_shrink_step(1).ok
        assert int(server.value("SELECT @@GLOBAL.max_session_mem_used")) == 64 * MiB
        assert g.originals.load()["caches"]["max_session_mem_used"] == 1024 * MiB
        assert g.collect().shrink_step == 1
        cur = before.cursor()
        cur.execute("SELECT @@SESSION.max_session_mem_used")
        assert int(cur.fetchone()[0]) == 1024 * MiB, "a session already open keeps its own cap"
        # A session that starts now asks for a 128 MiB sort buffer (a million 200-byte keys need
        # more than that; the OFFSET keeps MariaDB from sorting in a small priority queue) and is
        # refused by the server itself.
        late = server.connect()
        cur = late.cursor()
        cur.execute("SET SESSION sort_buffer_size = %s", (128 * MiB,))
        with pytest.raises(pymysql.err.MySQLError) as refused:
            cur.execute("SELECT seq FROM mysql.seq_1_to_1000000 ORDER BY CONCAT(REPEAT('x', 200), seq) "
                        "LIMIT 1 OFFSET 999990")
        assert refused.value.args[0] == 1290 and "max-session-mem-used" in str(refused.value), refused.value
        late.close()
        assert g.set_shrink_step(0).ok
        assert int(server.value("SELECT @@GLOBAL.max_session_mem_used")) == 1024 * MiB
        assert g.originals.load() is None
    finally:
        before.close()
        g.close()


def test_a_pool_at_its_floor_still_caps_new_sessions(mariadb_host, tmp_path):
    """Nothing to shrink in the pool (128 MiB, floor 128 MiB): the cap is the one step there is."""
    db = _server(innodb_buffer_pool_size="128M")
    g = MySQL(_config(db, tmp_path, buffer_pool_floor=128 * MiB), str(tmp_path / "state"))
    try:
        s = g.collect()
        assert (s.shrink_step, s.shrink_steps_max) == (0, 1), s
        assert g.set_shrink_step(1).ok
        assert int(db.value("SELECT @@GLOBAL.max_session_mem_used")) == 64 * MiB
        assert int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size")) == 128 * MiB
        assert g.collect().shrink_step == 1
        assert g.set_shrink_step(0).ok
        assert int(db.value("SELECT @@GLOBAL.max_session_mem_used")) == 2**63 - 1    # MariaDB's default
        assert g.originals.load() is None and g.collect().shrink_step == 0
    finally:
        g.close()
        db.destroy()
