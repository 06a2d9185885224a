"""A runaway PostgreSQL session is ended the database's way, and nobody else notices.

One session sorts ever more wide rows with work_mem=2GB inside a 500 MB memory cgroup,
growing ~30 MB/s (a pg_sleep every 100 rows keeps the pace steady on any machine). Left
alone, the kernel OOM-kills that backend and the postmaster runs crash recovery. With
`dbguard run` watching, the session must be cancelled or terminated via SQL
(pg_cancel_backend / pg_terminate_backend), with no signal-9 death and no crash recovery,
while two other sessions keep answering on their same connections.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest

from lab.cgroup import MemoryCgroup
from lab.launcher import audit_names
from lab.pgoutput import count_crash_recoveries
from lab.scenario import ScenarioEnv, dbguard_guard

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.db]

MiB = 1024 * 1024
LIMIT = 500 * MiB
# ~3.2 kB rows into an in-memory sort; 1M rows would need ~3 GB, far past the limit.
RUNAWAY_SQL = ("SELECT count(*) FROM (SELECT g, repeat(md5(g::text), 100) AS m "
               "FROM generate_series(1, 1000000) g "
               "WHERE g % 100 <> 0 OR pg_sleep(0.01) IS NOT NULL ORDER BY m) s")
ENDED_BY_SQL = ("canceling statement due to user request",            # pg_cancel_backend
                "terminating connection due to administrator command")  # pg_terminate_backend


class OtherSessions:
    """Sessions doing small queries on their own connections until stopped; records any error."""

    def __init__(self, dsn: str, n: int = 2):
        self.conns = [psycopg.connect(dsn, autocommit=True) for _ in range(n)]
        self.pids_before = [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in self.conns]
        self.queries = [0] * n
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(n)]

    def _work(self, i: int) -> None:
        conn = self.conns[i]
        while not self._stop.is_set():
            try:
                conn.execute("SELECT count(*) FROM small WHERE id %% %s = 0", (i + 2,)).fetchone()
                self.queries[i] += 1
            except psycopg.Error as e:
                self.errors.append(f"session {i}: {type(e).__name__}: {e}".splitlines()[0])
                return
            self._stop.wait(0.05)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> list[int]:
        """Stops the workers; the backend pids the connections have now."""
        self._stop.set()
        for t in self._threads:
            t.join(10)
        pids = []
        for c in self.conns:
            try:
                pids.append(c.execute("SELECT pg_backend_pid()").fetchone()[0])
            except psycopg.Error as e:
                self.errors.append(f"after the runaway: {type(e).__name__}: {e}".splitlines()[0])
                pids.append(None)
        return pids

    def close(self) -> None:
        self._stop.set()
        for c in self.conns:
            c.close()


def test_runaway_session_is_ended_by_sql_without_crash_recovery(scenario_host):
    from lab.pgcluster import PgCluster

    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(MemoryCgroup(LIMIT))
        cluster = stack.enter_context(PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dbguard-runaway-")))
        cluster.psql("CREATE TABLE small AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 1000) g")
        postmaster = cluster.postmaster_pid()

        others = OtherSessions(cluster.dsn)
        stack.callback(others.close)
        runaway = stack.enter_context(psycopg.connect(cluster.dsn, autocommit=True))
        runaway_pid = runaway.execute("SELECT pg_backend_pid()").fetchone()[0]
        runaway.execute("SET work_mem = '2GB'")
        # A bound for a guard that never acts: the kernel OOM killer would end it first anyway.
        runaway.execute("SET statement_timeout = '120s'")

        env = ScenarioEnv(cg, cluster, workdir, workdir / "audit.jsonl", log=print)
        stack.enter_context(dbguard_guard(env))
        others.start()
        with pytest.raises(psycopg.Error) as ended:
            runaway.execute(RUNAWAY_SQL)
        pids_after = others.stop()

        peak = cg.peak()
        server_log = cluster.log()
        up = cluster.is_up()
        try:
            postmaster_now = cluster.postmaster_pid()
        except OSError:          # postmaster.pid is gone: the server shut down
            postmaster_now = None
        audit = [json.loads(ln) for ln in (workdir / "audit.jsonl").read_text().splitlines() if ln.strip()]

    story = (f"\nrunaway pid {runaway_pid} ended with: {ended.value!s}".rstrip()
             + f"\npeak cgroup usage {peak // MiB} MiB of {LIMIT // MiB} MiB"
             + f"\nother sessions: queries {others.queries}, errors {others.errors}"
             + "\nserver log (tail):\n" + "\n".join(server_log.splitlines()[-15:])
             + "\naudit:\n" + "\n".join(json.dumps(a) for a in audit))

    assert peak >= 0.8 * LIMIT, "the runaway never pressed on the cgroup: the test proves nothing" + story
    assert any(msg in str(ended.value) for msg in ENDED_BY_SQL), \
        "the runaway session was not ended by pg_cancel_backend/pg_terminate_backend" + story
    assert "terminated by signal" not in server_log, "a PostgreSQL process died by a signal" + story
    assert count_crash_recoveries(server_log) == 0, story
    assert up and postmaster_now == postmaster, "PostgreSQL is down or was restarted" + story

    assert not others.errors, "another session saw an error" + story
    assert all(q > 0 for q in others.queries), "another session made no progress" + story
    assert pids_after == others.pids_before, "another session lost its connection" + story

    sql_ends = [a for a in audit if a.get("action") in ("cancel_query", "terminate_session")
                and audit_names(a, runaway_pid)]
    assert sql_ends, "no cancel_query/terminate_session audit record names the runaway backend" + story
    kills = [a for a in audit if "kill" in str(a.get("action", ""))]
    assert not any(audit_names(a, pid) for a in kills for pid in (runaway_pid, postmaster, *others.pids_before)), \
        "a PostgreSQL process was killed" + story

