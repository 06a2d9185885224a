"""The benchmark scenarios, each run once per call for one contender, as a JSON-able dict.

    moderate-hogs  lab.scenario.run_pg_scenario defaults: PostgreSQL + six 150 MB hogs, 1000 MB
    parent-limit   the same, the 1000 MB limit on a parent cgroup, PostgreSQL and the hogs in
                   unlimited sibling cgroups, no [pressure] cgroup for dbguard (a stock systemd host)
    moderate-hogs-mariadb  the same hogs next to MariaDB (512 MiB buffer pool kept full by
                   range reads) in a 1000 MB cgroup (scenario_mariadb.py)
    fast-hog       the same database and load, one hog allocating as fast as it can
    fast-hogs      issue #19: PostgreSQL (shared_buffers 400MB) in 900 MB, six 110 MB hogs started
                   together, each allocating as fast as it can, 25 rounds per run; with the time
                   from each killed process's first failing reclaim to its SIGKILL, by path
                   (scenario_fasthogs.py, reclaim_latency.py)
    runaway        a PostgreSQL session whose sort eats memory, 500 MB cgroup, pgbench beside it
    fork-storm     the postmaster (a protected parent) forks thousands of backends (scenario_fork.py)
    sessions       a dozen PostgreSQL sessions sorting at once, no outside process, 900 MB (scenario_sessions.py)
    sessions-mariadb  the same with MariaDB: sorts spilling merge runs to tmpdir, in-memory temp tables

Times are seconds since the load started (hogs, runaway query or storm): negative before.
Every run builds its own cgroup, cluster and data set, so each contender gets the same ones;
what every run records is benchmarks.record's.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from lab import hog
from lab.cgroup import MemoryCgroup
from lab.launcher import audit_records
from lab.pgoutput import count_crash_recoveries, crash_excerpt, parse_pgbench, server_log_victims
from lab.procs import stop_all
from lab.scenario import ScenarioEnv, postgres_pids, run_pg_scenario
from lab.watch import Kmsg, Watcher, cgroup_oom_victims

from .contenders import Contender, sampled
from .record import Log, Params, pressure_record
from .scenario_fasthogs import fast_hogs
from .scenario_fork import fork_storm
from .scenario_mariadb import moderate_hogs_mariadb
from .scenario_sessions import sessions, sessions_mariadb

MiB = 1024 * 1024

DEFAULTS = {
    "moderate-hogs": Params(duration=30, warmup=8.0),
    "parent-limit": Params(duration=30, warmup=8.0),
    "moderate-hogs-mariadb": Params(duration=30, warmup=8.0),
    "fast-hog": Params(duration=24, warmup=8.0),
    "fast-hogs": Params(duration=0, warmup=5.0, rounds=25),
    "runaway": Params(duration=40, warmup=6.0),
    "fork-storm": Params(duration=8, warmup=0.0),
    "sessions": Params(duration=33, warmup=3.0),
    "sessions-mariadb": Params(duration=33, warmup=3.0),
}
QUICK = {
    "moderate-hogs": Params(duration=24, warmup=6.0),
    "parent-limit": Params(duration=24, warmup=6.0),
    "moderate-hogs-mariadb": Params(duration=24, warmup=6.0),
    "fast-hog": Params(duration=18, warmup=6.0),
    "fast-hogs": Params(duration=0, warmup=5.0, rounds=5),
    "runaway": Params(duration=34, warmup=5.0),
    "fork-storm": Params(duration=5, warmup=0.0),
    "sessions": Params(duration=23, warmup=3.0),
    "sessions-mariadb": Params(duration=23, warmup=3.0),
}


def hog_alloc_rate(total: int = 2048 * MiB) -> float:
    """GiB/s at which the fast hog's allocator (lab.hog.grow, 64 MiB steps, no pause) fills
    memory when no limit is near: what it asks of the cgroup in the fast-hog scenario."""
    with MemoryCgroup(total + 1024 * MiB) as cg:
        p = hog.spawn(total, 64 * MiB, 0, 0, preexec_fn=cg.preexec(), stdout=subprocess.PIPE)
        try:
            line = hog.wait_holding(p, "the fast hog")
        finally:
            stop_all([p])
    return (total / 1024**3) / float(re.search(r"grown in ([\d.]+) s", line).group(1))


# --- scenarios 1 and 2: run_pg_scenario -------------------------------------------------------

def _pg_scenario(name: str, c: Contender, p: Params, log: Log, **kw) -> dict:
    sink: dict = {}
    wall_minus_mono = time.time() - time.monotonic()
    r = run_pg_scenario(sampled(c, sink), duration=p.duration, warmup=p.warmup, log=log, **kw)
    return pressure_record(
        p, sink, r.hogs_started_monotonic or 0.0, wall_minus_mono,
        progress=r.tps_progress, audit=r.audit, timeline=r.timeline, limit_at=r.limit_reached_at,
        first_kill=r.first_kill_at, db_deaths=r.postgres_deaths,
        db_survived=r.database_survived,
        postmaster_restarted=r.postmaster_restarted,
        crash_recoveries=r.crash_recoveries,
        sessions_lost=r.sessions_lost,
        tx_ok=r.transactions_ok,
        tx_failed=r.transactions_failed,
        client_errors=r.pgbench_errors[:5],
        hogs=r.hogs,
        hogs_killed=len(r.hogs_killed),
        kernel_oom_kills=r.oom_kills,
        oom_victims=r.oom_victims[:10],
        server_log=r.server_log_excerpt,
    )


def moderate_hogs(c: Contender, p: Params, log: Log) -> dict:
    return _pg_scenario("moderate-hogs", c, p, log)


def parent_limit(c: Contender, p: Params, log: Log) -> dict:
    return _pg_scenario("parent-limit", c, p, log, layout="parent")


def fast_hog(c: Contender, p: Params, log: Log) -> dict:
    # One hog asking for three times the limit in 64 MiB steps without pause (>1 GB/s here).
    return _pg_scenario("fast-hog", c, p, log, hogs=1, hog_size=3000 * MiB, step=64 * MiB,
                        step_interval=0.0, hog_stagger=0.0)


# --- scenario 3: a runaway query --------------------------------------------------------------

# As tests/e2e/test_runaway_session.py: ~3.2 kB rows into an in-memory sort, ~30 MB/s.
RUNAWAY_SQL = ("SELECT count(*) FROM (SELECT g, repeat(md5(g::text), 100) AS m "
               "FROM generate_series(1, 1000000) g "
               "WHERE g % 100 <> 0 OR pg_sleep(0.01) IS NOT NULL ORDER BY m) s")


def runaway_outcome(message: str | None) -> str:
    """How the runaway query ended, from the error its client saw."""
    if message is None:
        return "completed"
    m = message.lower()
    if "due to user request" in m:
        return "cancelled (pg_cancel_backend)"
    if "administrator command" in m:
        return "terminated (pg_terminate_backend)"
    if "statement timeout" in m:
        return "statement_timeout"
    if "crash of another server process" in m or "closed the connection unexpectedly" in m \
            or "server conn crashed" in m or "terminated abnormally" in m or "connection" in m:
        return "backend killed (connection lost)"
    return "error: " + message.splitlines()[0][:80]


def runaway(c: Contender, p: Params, log: Log) -> dict:
    import psycopg
    from lab.pgcluster import PgCluster

    limit = 500 * MiB
    sink: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-bench-runaway-{c.name}-"))
    kmsg = Kmsg()
    watcher: Watcher | None = None
    pgbench = None
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(4096 * MiB))
            cluster = stack.enter_context(PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg))
            cluster.pgbench_init(10)
            cg.set_limit(limit)
            postmaster = cluster.postmaster_pid()
            env = ScenarioEnv(cg, cluster, workdir, workdir / "audit.jsonl", lambda m: log(f"[{c.name}] {m}"))
            wall_minus_mono = time.time() - time.monotonic()
            stack.enter_context(sampled(c, sink)(env))
            runaway_conn = stack.enter_context(psycopg.connect(cluster.dsn, autocommit=True))
            rpid = runaway_conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            runaway_conn.execute("SET work_mem = '2GB'")
            runaway_conn.execute(f"SET statement_timeout = '{p.duration}s'")   # a bound if nobody acts

            t_bench = time.monotonic()
            pgbench = cluster.pgbench("-S", "-c", "4", "-j", "2", "-T", str(p.duration), "-P", "1",
                                      "--no-vacuum")
            time.sleep(p.warmup)
            t0 = time.monotonic()
            watcher = Watcher(cg, t0, kills_until=t_bench + p.duration)
            watcher.note("pgbench started", at=t_bench)
            for pid, title in postgres_pids(cg, postmaster).items():
                label = ("postmaster" if pid == postmaster else
                         f"runaway backend (pid {pid})" if pid == rpid else f"postgres pid {pid} ({title})")
                watcher.watch_process(pid, label)
            watcher.start()
            watcher.note("runaway query starts")
            ended: dict = {}

            def run_query() -> None:
                try:
                    runaway_conn.execute(RUNAWAY_SQL)
                    ended["error"] = None
                except psycopg.Error as e:
                    ended["error"] = str(e)
                ended["at"] = time.monotonic()
            th = threading.Thread(target=run_query, daemon=True)
            th.start()
            try:
                out, err = pgbench.communicate(timeout=p.duration + 60)
            except subprocess.TimeoutExpired:
                pgbench.kill()
                out, err = pgbench.communicate()
            th.join(30)
            if "at" in ended:
                watcher.note(f"runaway query ended: {runaway_outcome(ended.get('error'))}", at=ended["at"])
            watcher.note(f"pgbench finished (exit {pgbench.returncode})")
            time.sleep(1.0)
            survived = cluster.is_up()
            watcher.stop()
            server_log = cluster.log()
            try:
                pm_now = cluster.postmaster_pid()
            except OSError:
                pm_now = None
            bench = parse_pgbench(out or "", err or "")
            progress = [(t - (t0 - t_bench), tps) for t, tps in bench.progress]
            victims = cgroup_oom_victims(kmsg.read(), cg.relpath, server_log_victims(server_log))
            end_at = ended["at"] - t0 if "at" in ended else None
            # The first thing that ended the runaway or anything else: a death, or the SQL cancel.
            firsts = [x for x in (watcher.first_kill, end_at if ended.get("error") else None) if x is not None]
            return pressure_record(
                p, sink, t0, wall_minus_mono, progress=progress, audit=audit_records(env.audit_path),
                timeline=watcher.timeline, limit_at=watcher.limit_reached, first_kill=min(firsts) if firsts else None,
                db_deaths=[lbl for lbl in watcher.deaths if not lbl.startswith("runaway")],
                db_survived=survived and pm_now == postmaster,
                postmaster_restarted=pm_now is not None and pm_now != postmaster,
                crash_recoveries=count_crash_recoveries(server_log),
                sessions_lost=bench.sessions_lost,
                tx_ok=bench.transactions_ok,
                tx_failed=bench.transactions_failed,
                client_errors=bench.errors[:5],
                runaway_outcome=runaway_outcome(ended.get("error")) if "at" in ended else "still running",
                runaway_ended_at=end_at,
                runaway_killed_by_signal=any(lbl.startswith("runaway") for lbl in watcher.deaths),
                kernel_oom_kills=cg.oom_kills(),
                oom_victims=victims[:10],
                server_log=crash_excerpt(server_log),
            )
    finally:
        with contextlib.suppress(Exception):
            if watcher is not None and watcher.is_alive():
                watcher.stop()
        with contextlib.suppress(Exception):
            if pgbench is not None and pgbench.poll() is None:
                pgbench.kill()
                pgbench.wait()
        kmsg.close()
        shutil.rmtree(workdir, ignore_errors=True)


SCENARIOS = {
    "moderate-hogs": moderate_hogs,
    "parent-limit": parent_limit,
    "moderate-hogs-mariadb": moderate_hogs_mariadb,
    "fast-hog": fast_hog,
    "fast-hogs": fast_hogs,
    "runaway": runaway,
    "fork-storm": fork_storm,
    "sessions": sessions,
    "sessions-mariadb": sessions_mariadb,
}
# The database each scenario runs (dbguard's kind): a contender runs where its
# Contender.databases holds it (pg-documented only next to PostgreSQL, and so on).
DATABASE = {name: "postgresql" for name in SCENARIOS} | {"moderate-hogs-mariadb": "mysql", "sessions-mariadb": "mysql"}
