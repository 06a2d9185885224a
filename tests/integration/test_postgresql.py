"""The PostgreSQL adapter against a real throwaway PostgreSQL 15 the test starts (lab.pgcluster)."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import psycopg
import pytest

from dbguard.settings import DatabaseConfig
from dbguard.databases.postgresql import PostgreSQL
from dbguard.databases.postgresql.adapter import COLLECT_BUDGET
from dbguard.model import Role, Status

pytestmark = pytest.mark.db

MiB = 1024**2


@pytest.fixture(scope="module")
def cluster(postgresql_host):
    from lab.pgcluster import PgCluster
    # work_mem comes from postgresql.conf; maintenance_work_mem is set by ALTER SYSTEM below,
    # so both ways a DBA configures a setting are covered.
    with PgCluster(settings={"shared_buffers": "64MB", "work_mem": "8MB"}) as c:
        c.psql("ALTER SYSTEM SET maintenance_work_mem = '64MB'")
        c.psql("SELECT pg_reload_conf()")
        wait_for(lambda: c.psql("SHOW maintenance_work_mem"), "64MB")
        yield c


def wait_for(read, expected, timeout: float = 20.0):
    """Poll until read() == expected (reloads and signals are asynchronous); fail with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {expected!r}, still {value!r} after {timeout}s")
        time.sleep(0.05)


def make_cfg(dsn: str, **kw) -> DatabaseConfig:
    # The sizes alone: hash_mem_multiplier (a default too) has its own test in test_pg_originals.
    base = dict(kind="postgresql", name="t", dsn=dsn, shrink_floor=2 * MiB, shrink_steps=5,
                shrink_settings=("work_mem", "maintenance_work_mem"), connect_timeout=2.0, statement_timeout=2.0)
    base.update(kw)
    return DatabaseConfig(**base)


@pytest.fixture
def adapter(cluster, tmp_path):
    db = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
    yield db
    db.set_shrink_step(0)      # never leave the shared cluster shrunk for the next test
    db.close()


def auto_conf(cluster) -> str:
    return Path(cluster.data_dir, "postgresql.auto.conf").read_text()


def pids_of(cluster, backend_type: str) -> list[int]:
    out = cluster.psql(f"SELECT pid FROM pg_stat_activity WHERE backend_type = '{backend_type}'")
    return [int(x) for x in out.split()]


# --- collect ---------------------------------------------------------------------------------
def test_collect_reports_server_roles_and_cache(cluster, adapter):
    stats = adapter.collect()
    assert stats.up, stats.error
    assert stats.server_pid == cluster.postmaster_pid()
    assert os.path.realpath(stats.data_directory) == os.path.realpath(cluster.data_dir)
    assert stats.roles[stats.server_pid] is Role.POSTMASTER
    for aux in ("checkpointer", "walwriter", "background writer"):
        pids = pids_of(cluster, aux)
        assert pids, f"no {aux} in pg_stat_activity"
        assert all(stats.roles.get(p) is Role.PG_AUXILIARY for p in pids), (aux, stats.roles)
    assert stats.cache_bytes == stats.cache_configured_bytes == 64 * MiB
    assert stats.cache_used_bytes == 0 and "pg_buffercache" in stats.extra["cache_used"]
    assert stats.hit_ratio is not None and 0.0 <= stats.hit_ratio <= 1.0
    assert stats.extra["settings"] == {"work_mem": "8MB", "maintenance_work_mem": "64MB"}
    assert stats.extra["backends"]["checkpointer"] == 1
    # 8MB -> 2MB floor takes 2 halvings, 64MB takes 5: the deeper one, capped at shrink_steps.
    assert stats.shrink_steps_max == 5 and stats.shrink_step == 0
    own = adapter.link.conn.execute("SELECT current_setting('statement_timeout'), "
                                "current_setting('application_name')").fetchone()
    assert own == ("2s", "dbguard")

    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SELECT repeat('x', 1000)")
        stats = adapter.collect()
    assert stats.roles.get(pid) is Role.PG_BACKEND
    session = next(s for s in stats.sessions if s.pid == pid)
    assert session.kind == "client backend" and session.user == "postgres"
    assert session.query == "SELECT repeat('x', 1000)" and session.state == "idle"
    assert session.memory_bytes > 0      # RssAnon of a live backend
    # dbguard's own connection is a backend, but never a session to act on.
    assert all(s.pid != adapter.link.conn.info.backend_pid for s in stats.sessions)


def test_collect_truncates_long_queries(cluster, adapter):
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SELECT '" + "y" * 500 + "'")
        stats = adapter.collect()
    assert len(next(s for s in stats.sessions if s.pid == pid).query) == 200


def test_cache_used_with_pg_buffercache(cluster, tmp_path):
    cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_buffercache")
    try:
        db = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
        stats = db.collect()
        db.close()
        expected = int(cluster.psql("SELECT count(*) * current_setting('block_size')::int FROM pg_buffercache "
                                    "WHERE relfilenode IS NOT NULL"))
        assert stats.up, stats.error
        assert "cache_used" not in stats.extra
        # Buffers only fill up between the two reads, never empty (no restart in between).
        assert 0 < stats.cache_used_bytes <= expected <= stats.cache_bytes
    finally:
        cluster.psql("DROP EXTENSION pg_buffercache")


# --- shrinking -------------------------------------------------------------------------------
def show(cluster, name: str) -> str:
    return cluster.psql(f"SHOW {name}")


def test_shrink_halves_respects_floor_and_restores_exactly(cluster, adapter, tmp_path):
    before_auto = auto_conf(cluster)
    out = adapter.set_shrink_step(1)
    assert out.ok, out.detail
    wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("4MB", "32MB"))
    state = adapter.originals.load()
    assert state["step"] == 1
    assert state["settings"]["work_mem"] == {"value": "8MB", "bytes": 8 * MiB, "auto_conf": False, "set": "4MB"}
    assert state["settings"]["maintenance_work_mem"] == {"value": "64MB", "bytes": 64 * MiB, "auto_conf": True,
                                                          "set": "32MB"}
    # Keyed by the server (pg_controldata reads the control file: not dbguard's SQL).
    assert state["identity"] == {"system_identifier": cluster.system_identifier(),
                               "data_directory": cluster.data_dir}, state["identity"]
    assert adapter.collect().shrink_step == 1

    out = adapter.set_shrink_step(3)     # work_mem would be 1MB: held at the 2MB floor
    assert out.ok, out.detail
    wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("2MB", "8MB"))
    assert adapter.originals.load()["settings"]["work_mem"]["bytes"] == 8 * MiB   # originals kept, not the shrunk

    out = adapter.set_shrink_step(99)    # clamped to shrink_steps_max
    assert out.ok and "step 5" in out.detail, out.detail
    wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("2MB", "2MB"))

    out = adapter.set_shrink_step(0)
    assert out.ok, out.detail
    wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("8MB", "64MB"))
    # Exactly as before: the DBA's ALTER SYSTEM line is back, work_mem is again from postgresql.conf.
    assert auto_conf(cluster) == before_auto
    src = cluster.psql("SELECT name || '=' || sourcefile FROM pg_settings "
                       "WHERE name IN ('work_mem', 'maintenance_work_mem') ORDER BY name").split()
    # (lab.pgcluster writes the cluster's settings into dbguard-lab.conf, included from postgresql.conf)
    assert src[0].endswith("/postgresql.auto.conf") and src[1].endswith("/dbguard-lab.conf"), src
    assert adapter.originals.load() is None
    assert adapter.set_shrink_step(0).ok       # idempotent


def test_recover_after_crash_mid_shrink(cluster, tmp_path):
    before_auto = auto_conf(cluster)
    first = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
    assert first.set_shrink_step(2).ok
    first.close()                              # dbguard "dies" with the settings shrunk
    wait_for(lambda: show(cluster, "work_mem"), "2MB")

    second = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
    try:
        assert second.collect().shrink_step == 2
        out = second.recover()                  # work_mem needs no refill: all of it back at once
        assert out.carried_out, out.detail
        wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("8MB", "64MB"))
        assert auto_conf(cluster) == before_auto
        assert second.originals.load() is None
        assert second.collect().shrink_step == 0
        again = second.recover()                # nothing left to do
        assert again.status is Status.SKIPPED and "nothing to recover" in again.detail, again
    finally:
        second.set_shrink_step(0)
        second.close()


def test_shrink_refused_without_privilege(cluster, tmp_path):
    cluster.psql("DROP ROLE IF EXISTS weakling; CREATE ROLE weakling LOGIN")
    before_auto = auto_conf(cluster)
    db = PostgreSQL(make_cfg(cluster.dsn_for("weakling")), str(tmp_path))
    try:
        assert db.collect().up
        out = db.set_shrink_step(1)
        assert not out.ok
        assert "permission denied for ALTER SYSTEM" in out.detail
        assert "GRANT ALTER SYSTEM ON PARAMETER work_mem TO weakling" in out.detail
        assert "\n" not in out.detail
        assert auto_conf(cluster) == before_auto
        assert (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")) == ("8MB", "64MB")
        assert db.originals.load() is None
    finally:
        db.close()
        cluster.psql("DROP ROLE weakling")


def test_shrink_with_parameter_grants_but_hidden_sourcefile_refuses(cluster, tmp_path):
    # Without pg_read_all_settings we cannot tell ALTER SYSTEM from postgresql.conf: refuse, change nothing.
    cluster.psql("DROP ROLE IF EXISTS granted; CREATE ROLE granted LOGIN; "
                 "GRANT ALTER SYSTEM ON PARAMETER work_mem, maintenance_work_mem TO granted; "
                 "GRANT EXECUTE ON FUNCTION pg_reload_conf() TO granted")
    before_auto = auto_conf(cluster)
    db = PostgreSQL(make_cfg(cluster.dsn_for("granted")), str(tmp_path))
    try:
        out = db.set_shrink_step(1)
        assert not out.ok and "GRANT pg_read_all_settings TO granted" in out.detail, out.detail
        assert auto_conf(cluster) == before_auto and db.originals.load() is None

        cluster.psql("GRANT pg_read_all_settings TO granted")
        out = db.set_shrink_step(1)
        assert out.ok, out.detail
        wait_for(lambda: show(cluster, "work_mem"), "4MB")
        assert db.set_shrink_step(0).ok
        wait_for(lambda: show(cluster, "work_mem"), "8MB")
        assert auto_conf(cluster) == before_auto
    finally:
        db.set_shrink_step(0)
        db.close()
        cluster.psql("REVOKE ALTER SYSTEM ON PARAMETER work_mem, maintenance_work_mem FROM granted; "
                     "DROP OWNED BY granted; DROP ROLE granted")


# --- sessions --------------------------------------------------------------------------------
class SleepingSession:
    """A client connection running pg_sleep in a thread; records how the statement ended."""

    def __init__(self, dsn: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.pid = self.conn.info.backend_pid
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.execute("SELECT pg_sleep(60)")
        except BaseException as e:      # noqa: BLE001 - recorded for the test to inspect
            self.error = e

    def close(self) -> None:
        self.conn.close()
        self.thread.join(5)


def active(cluster, pid: int) -> str:
    return cluster.psql(f"SELECT state || ':' || query FROM pg_stat_activity WHERE pid = {pid}")


def test_cancel_ends_query_session_survives(cluster, adapter):
    s = SleepingSession(cluster.dsn)
    try:
        wait_for(lambda: active(cluster, s.pid), "active:SELECT pg_sleep(60)")
        out = adapter.cancel(s.pid)
        assert out.ok, out.detail
        s.thread.join(20)
        assert not s.thread.is_alive()
        assert isinstance(s.error, psycopg.errors.QueryCanceled), s.error
        assert s.conn.execute("SELECT 1").fetchone() == (1,)      # the session lives on
    finally:
        s.close()


def test_terminate_ends_session_without_crash(cluster, adapter):
    s = SleepingSession(cluster.dsn)
    try:
        wait_for(lambda: active(cluster, s.pid), "active:SELECT pg_sleep(60)")
        out = adapter.terminate(s.pid)
        assert out.ok, out.detail
        s.thread.join(20)
        assert isinstance(s.error, psycopg.OperationalError), s.error
        wait_for(lambda: active(cluster, s.pid), "")
        out = adapter.terminate(s.pid)          # the session ended: gone, not refused
        assert out.status is Status.GONE and "not a backend" in out.detail, out
    finally:
        s.close()
    assert "terminated by signal" not in cluster.log()
    assert "terminating connection due to administrator command" in cluster.log()


def test_cancel_refuses_what_is_not_a_session(cluster, adapter):
    checkpointer = pids_of(cluster, "checkpointer")[0]
    out = adapter.cancel(checkpointer)
    assert out.status is Status.REFUSED and "checkpointer" in out.detail
    out = adapter.terminate(cluster.postmaster_pid())
    assert out.status is Status.REFUSED and "not a backend" in out.detail
    out = adapter.terminate(os.getpid())
    assert out.status is Status.REFUSED and "not a backend" in out.detail
    out = adapter.terminate(adapter.link.conn.info.backend_pid)     # dbguard's own connection
    assert out.status is Status.REFUSED and "not a session" in out.detail
    assert cluster.is_up()


# --- failures --------------------------------------------------------------------------------
def test_stopped_server_is_down_with_one_line_error(tmp_path, postgresql_host):
    """Decision: server_pid is the live postmaster from postmaster.pid, else None (never a stale pid)."""
    from lab.pgcluster import PgCluster
    with PgCluster() as c:
        db = PostgreSQL(make_cfg(c.dsn), str(tmp_path))
        try:
            up = db.collect()
            assert up.up and up.server_pid == c.postmaster_pid()
            c.stop()
            down = db.collect()
            assert not down.up
            assert "\n" not in down.error
            assert down.error == (f"cannot connect to host={c.socket_dir} port={c.port}: connection refused; "
                                  "is PostgreSQL running?")
            assert down.server_pid is None and down.roles == {}
            # A pid file left behind whose pid is some other live process: still not a server pid.
            Path(c.data_dir, "postmaster.pid").write_text(f"{os.getpid()}\n{c.data_dir}\n0\n{c.port}\n")
            assert db.collect().server_pid is None
            os.unlink(Path(c.data_dir, "postmaster.pid"))
            c.start()
            again = db.collect()     # reconnects by itself
            assert again.up and again.server_pid == c.postmaster_pid(), again.error
        finally:
            db.close()


def test_wrong_password_one_line_without_password(cluster, tmp_path, monkeypatch):
    cluster.psql("DROP ROLE IF EXISTS pwuser; CREATE ROLE pwuser LOGIN PASSWORD 'right-Secret-1'")
    try:
        monkeypatch.setenv("DBGUARD_TEST_PW", "wrong-Secret-9")
        # data_directory from the config: the adapter never got in, yet knows the postmaster.
        db = PostgreSQL(make_cfg(cluster.tcp_dsn_for("pwuser"), password_env="DBGUARD_TEST_PW",
                                 data_directory=cluster.data_dir), str(tmp_path))
        stats = db.collect()
        assert not stats.up
        assert stats.error == (f'cannot connect to host=127.0.0.1 port={cluster.port}: password authentication '
                               'failed for user "pwuser"; check password_file / password_env')
        assert "wrong-Secret-9" not in stats.error
        assert stats.server_pid == cluster.postmaster_pid()     # known from the pid file, SQL or not
        outcome = db.set_shrink_step(1)
        assert not outcome.ok and "password authentication failed" in outcome.detail
        monkeypatch.setenv("DBGUARD_TEST_PW", "right-Secret-1")
        assert db.collect().up
        db.close()
    finally:
        cluster.psql("DROP ROLE pwuser")


@pytest.mark.parametrize("content", ['{not json', '{"step": 1, "settings": {"work_mem": {"bytes": "8MB"}}}',
                                     '{"step": -1, "saved_at": 0, "settings": {}}'])
def test_damaged_state_file_is_moved_aside_and_protection_goes_on(cluster, tmp_path, caplog, content):
    """A corrupt or hand-edited file once stopped the daemon or crashed it at the first shrink
    (KeyError, TypeError): now it is moved aside with one warning and shrinking works."""
    db = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
    try:
        db.originals.path.write_text(content)
        with caplog.at_level("WARNING", logger="dbguard"):
            stats = db.collect()
        assert stats.up and stats.shrink_step == 0 and "state_error" not in stats.extra, stats
        aside = sorted(tmp_path.glob("originals-t.json.damaged-*"))
        assert len(aside) == 1 and aside[0].read_text() == content
        warnings = [r.getMessage() for r in caplog.records if "damaged state file" in r.getMessage()]
        assert len(warnings) == 1 and "work_mem, maintenance_work_mem" in warnings[0], caplog.text
        out = db.set_shrink_step(1)
        assert out.ok, out.detail
        wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("4MB", "32MB"))
        assert db.originals.load()["settings"]["work_mem"]["bytes"] == 8 * MiB
        assert db.set_shrink_step(0).ok
        wait_for(lambda: (show(cluster, "work_mem"), show(cluster, "maintenance_work_mem")), ("8MB", "64MB"))
    finally:
        db.set_shrink_step(0)
        db.originals.clear()
        db.close()


def test_hung_server_does_not_stall_collect(cluster, tmp_path):
    """A backend that stops answering (here: our own throwaway backend paused with SIGSTOP by the
    test harness, as a hung server or a silent network would be) must not hang the caller."""
    import signal
    db = PostgreSQL(make_cfg(cluster.dsn, connect_timeout=1.0, statement_timeout=1.0), str(tmp_path))
    assert db.collect().up
    backend = db.link.conn.info.backend_pid
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(first=db.collect(), second=db.collect()), daemon=True)
    os.kill(backend, signal.SIGSTOP)
    try:
        caller.start()
        caller.join(60)         # a hang detector only: the adapter's collect budget is 0.5 s
        assert not caller.is_alive(), "collect() blocked on a server that does not answer"
    finally:
        os.kill(backend, signal.SIGCONT)
    first, second = result["first"], result["second"]
    assert not first.up and f"no answer within {COLLECT_BUDGET:.1f}s" in first.error, first.error
    assert first.server_pid == cluster.postmaster_pid()          # by fact: shielding needs no SQL
    assert not second.up and "to an earlier statement" in second.error, second.error
    wait_for(lambda: db.link.stuck_for() is None, True)
    again = db.collect()
    assert again.up, again.error
    assert db.link.conn.info.backend_pid == backend        # the worker gave the connection back
    db.close()


# --- session memory: private memory and temporary files, per session --------------------------
# Each statement does its memory-hungry part (a sort) first, then sleeps once while reading the
# sorted rows back, so the sort's memory or its tapes are held while the test looks.
IN_MEMORY_SORT = ("SELECT count(*) FROM (SELECT g, md5(g::text) AS m FROM generate_series(1, 600000) g "
                  "ORDER BY m) s WHERE g <> 7 OR pg_sleep(8) IS NOT NULL")
SPILLING_SORT = ("SELECT count(*) FROM (SELECT g, md5(g::text) AS m FROM generate_series(1, 600000) g "
                 "ORDER BY m) s WHERE g <> 7 OR pg_sleep(8) IS NOT NULL")


def _run_in_background(dsn: str, setup: str, sql: str) -> tuple[threading.Thread, int]:
    conn = psycopg.connect(dsn, autocommit=True)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.execute(setup)

    def work():
        with conn, contextlib.suppress(psycopg.errors.QueryCanceled):    # the test cancels it at the end
            conn.execute(sql)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, pid


def test_session_memory_and_temporary_files_are_the_sessions_own(cluster, adapter, tmp_path):
    mem_t, mem_pid = _run_in_background(cluster.dsn, "SET work_mem = '512MB'", IN_MEMORY_SORT)
    tmp_t, tmp_pid = _run_in_background(cluster.dsn, "SET work_mem = '1MB'", SPILLING_SORT)
    try:
        # The oracle for temporary files is PostgreSQL's own listing (pg_ls_tmpdir, a directory
        # read), not /proc: wait until the spilling sort's files are there and the other one sleeps.
        def spilled() -> int:
            out = cluster.psql(f"SELECT coalesce(sum(size), 0) FROM pg_ls_tmpdir() WHERE name LIKE 'pgsql_tmp{tmp_pid}.%'")
            return int(out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                spilled() > 0 and cluster.psql(f"SELECT wait_event FROM pg_stat_activity WHERE pid IN "
                                               f"({mem_pid}, {tmp_pid}) AND wait_event = 'PgSleep'").count("PgSleep") == 2):
            time.sleep(0.2)
        on_disk = spilled()
        query_start = float(cluster.psql(f"SELECT extract(epoch FROM query_start) FROM pg_stat_activity "
                                         f"WHERE pid = {mem_pid}"))
        stats = adapter.collect()
        sessions = {s.pid: s for s in stats.sessions}
        cfg = tmp_path / "explain.toml"
        cfg.write_text(f'[general]\ndiscover = false\nstate_dir = "{tmp_path}/state"\n'
                       f'[audit]\npath = "{tmp_path}/audit.jsonl"\n[metrics]\nlisten = ""\n'
                       f'[[databases]]\nkind = "postgresql"\nname = "t"\ndsn = "{cluster.dsn}"\n')
        import json
        import subprocess
        import sys
        r = subprocess.run([sys.executable, "-m", "dbguard.cli", "explain", "-c", str(cfg), "--json"],
                           capture_output=True, text=True, timeout=60)
        text = subprocess.run([sys.executable, "-m", "dbguard.cli", "explain", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)
    finally:
        for pid in (mem_pid, tmp_pid):
            cluster.psql(f"SELECT pg_cancel_backend({pid})")
        mem_t.join(20)
        tmp_t.join(20)
    assert on_disk > 4 * MiB, f"the spilling sort wrote only {on_disk} bytes of temporary files"
    # 600,000 rows, each a 33-byte md5 text, an int and a 24-byte SortTuple, sorted in memory:
    # over 36 MiB of the backend's own memory (shared buffers are not in it: the sort reads none).
    assert sessions[mem_pid].memory_bytes > 30 * MiB, sessions[mem_pid]
    assert sessions[mem_pid].temp_bytes == 0, sessions[mem_pid]
    assert sessions[mem_pid].started == pytest.approx(query_start, abs=1e-5)   # names the statement
    # The spilling sort's open files, as the kernel shows them, are the files PostgreSQL lists
    # for it (the sort is finished: nothing is written any more while it sleeps).
    assert sessions[tmp_pid].temp_bytes == on_disk, (sessions[tmp_pid], on_disk)
    assert sessions[tmp_pid].memory_bytes < sessions[mem_pid].memory_bytes
    assert r.returncode == 0, r.stderr
    top = next(d for d in json.loads(r.stdout)["databases"] if d["name"] == "t")["top_sessions"]
    assert [s["pid"] for s in top[:1]] == [mem_pid], top
    assert {s["pid"]: s["temp_bytes"] for s in top}[tmp_pid] == on_disk, top
    assert all("query" not in s for s in top)          # never the statement's text
    assert f"session {mem_pid} client backend" in text.stdout, text.stdout
    assert "pg_sleep" not in text.stdout


def test_identified_by_fact_when_the_login_is_refused(cluster, tmp_path):
    """No SQL at all (the role does not exist): the postmaster is still found, from the socket's
    lock file over the unix socket and from the listening socket's holder over TCP; its data
    directory is its cwd. The oracle is the cluster's own postmaster.pid (lab.pgcluster)."""
    for dsn, how in ((cluster.dsn_for("nosuchrole"), "socket lock file"),
                     (cluster.tcp_dsn_for("nosuchrole"), "listening socket of 127.0.0.1")):
        db = PostgreSQL(make_cfg(dsn), str(tmp_path))
        try:
            s = db.collect()
            # refused either way: no such role (trust over the socket), no password (TCP)
            assert not s.up and ('"nosuchrole" does not exist' in s.error or "no password" in s.error), s.error
            assert s.server_pid == cluster.postmaster_pid(), s.identity
            assert s.identity.startswith(how), s.identity
            assert os.path.samefile(s.data_directory, cluster.data_dir)
            assert s.roles == {cluster.postmaster_pid(): Role.POSTMASTER}
        finally:
            db.close()


def test_login_only_role_is_identified_without_data_directory(cluster, tmp_path):
    """A role with LOGIN alone cannot read data_directory: the postmaster comes from facts."""
    cluster.psql("DROP ROLE IF EXISTS loginonly; CREATE ROLE loginonly LOGIN")
    db = PostgreSQL(make_cfg(cluster.dsn_for("loginonly")), str(tmp_path))
    try:
        s = db.collect()
        assert s.up, s.error
        assert db.link.data_directory == ""              # SQL did not tell it
        assert s.server_pid == cluster.postmaster_pid() and s.identity.startswith("socket lock file")
    finally:
        db.close()


def test_nothing_to_identify_says_why(tmp_path):
    from dbguard.databases.postgresql.identity import identify
    found = identify(make_cfg(f"host={tmp_path} port=5999 dbname=postgres"))
    assert found.pid is None and f"cannot read {tmp_path}/.s.PGSQL.5999.lock" in found.why_not
