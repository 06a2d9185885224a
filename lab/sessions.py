"""The database as its own hog: many sessions sorting at once, no outside process.

PostgreSQL 15 with `shared_buffers=200MB` and `work_mem=96MB` in a 900 MB memory cgroup:
`pgbench -S` clients and a dozen sessions each sorting a table larger than work_mem in a
loop. Together the sorts want more than the cgroup holds; without a guard the kernel
OOM-kills a backend and PostgreSQL goes through crash recovery.

    result = run_pg_sessions("none")        # the control case
    result = run_pg_sessions("dbguard")     # `dbguard run` watching the cgroup

Used by tests/e2e/test_session_storm.py and the benchmarks' "sessions" scenario. What a
large query's end was is read from the client's own error (PostgreSQL's words), not from
dbguard's audit log, so the result is an independent account of what dbguard did.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psycopg

from lab.cgroup import MemoryCgroup
from lab.launcher import audit_records
from lab.pgoutput import count_crash_recoveries, crash_excerpt, parse_pgbench
from lab.scenario import Guard, ScenarioEnv, _resolve_guard, dbguard_guard, require_lab
from lab.watch import Kmsg, Watcher, kmsg_oom_victims

MiB = 1024 * 1024

# Every row of pgbench_accounts (scale 10: 1M rows, ~130 MB) sorted by a key no index gives:
# the sort fills work_mem, then spills to temporary files and merges.
PG_SORT = "SELECT count(*) FROM (SELECT * FROM pgbench_accounts ORDER BY md5(aid::text)) s"
CANCELLED = "canceling statement due to user request"          # pg_cancel_backend, or SIGINT
TERMINATED = "terminating connection due to administrator command"


@dataclass
class QueryCounts:
    finished: int = 0
    cancelled: int = 0          # ended by a cancel (pg_cancel_backend / KILL QUERY)
    terminated: int = 0         # ended with its session (pg_terminate_backend / KILL CONNECTION)
    refused: int = 0            # refused by the server's per-session memory cap (MariaDB max_session_mem_used)
    failed: int = 0             # any other error: a crash, a lost connection
    errors: list[str] = field(default_factory=list)


class SortLoad:
    """`n` sessions, each on its own connection, running its statement again and again until
    stopped; session i runs `sql[i % len(sql)]` (one statement: all run it). A session whose
    connection broke reconnects (a crash shows as failed queries, not as a silent stop).
    `classify(error) -> "cancelled" | "terminated" | "refused" | "failed"`. `ident`: the SQL
    that gives a session's id as the server names it (its backend pid, its connection id):
    every id the sessions had is in `ids`, the oracle of which sessions were the load's."""

    def __init__(self, connect: Callable[[], object], sql: str | tuple[str, ...], n: int,
                 classify: Callable[[Exception], str], setup: tuple[str, ...] = (), ident: str | None = None):
        self.connect, self.n, self.classify, self.setup, self.ident = connect, n, classify, setup, ident
        self.sqls = (sql,) if isinstance(sql, str) else tuple(sql)
        self.counts = QueryCounts()
        self.ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(self.sqls[i % len(self.sqls)],), daemon=True,
                                          name=f"sort-{i}") for i in range(n)]

    def _note(self, what: str, error: Exception | None = None) -> None:
        with self._lock:
            setattr(self.counts, what, getattr(self.counts, what) + 1)
            if error is not None and len(self.counts.errors) < 20:
                self.counts.errors.append(f"{what}: {type(error).__name__}: {str(error).splitlines()[0]}")

    def _work(self, sql: str) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self.connect()
                    for stmt in self.setup:
                        _execute(conn, stmt)
                    if self.ident:
                        with self._lock:
                            self.ids.add(int(_execute(conn, self.ident)[0][0]))
                _execute(conn, sql)
                self._note("finished")
            except Exception as e:          # noqa: BLE001 - every end is counted, by its kind
                if self._stop.is_set():
                    break
                kind = self.classify(e)
                self._note(kind, e)
                if kind == "refused":           # a client told no waits a little before it asks again
                    self._stop.wait(0.5)
                elif kind != "cancelled":
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                    self._stop.wait(0.5)
        with contextlib.suppress(Exception):
            conn.close()

    def start(self) -> "SortLoad":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 60) -> QueryCounts:
        """Stops at the end of the running statements (a statement ended by the stop is not counted)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        return self.counts


def _execute(conn, sql: str) -> list:
    if isinstance(conn, psycopg.Connection):
        return conn.execute(sql).fetchall()
    cur = conn.cursor()
    cur.execute(sql)
    return list(cur.fetchall())


def pg_classify(e: Exception) -> str:
    text = str(e)
    if isinstance(e, psycopg.errors.QueryCanceled) and CANCELLED in text:
        return "cancelled"
    if TERMINATED in text:
        return "terminated"
    return "failed"


@dataclass
class SessionsResult:
    guard: str
    database_survived: bool
    crash_recoveries: int
    oom_kills: int
    transactions_ok: int
    transactions_failed: int       # pgbench's failed transactions, one per aborted client included
    sessions_lost: int             # pgbench clients that lost their connection
    large: QueryCounts
    peak_bytes: int
    limit_bytes: int
    limit_reached_at: float | None  # seconds after the sorts started, when the cgroup hit its limit
    audit: list[dict]
    server_log_excerpt: str
    pgbench_errors: list[str]
    timeline: list = field(default_factory=list)
    guard_output: str = ""          # dbguard's log, when it was the guard
    guard_running: bool | None = None  # dbguard still running when the load ended (None: no dbguard)
    load_started_wall: float = 0.0     # time.time() when the sorts started
    load_started_monotonic: float = 0.0
    progress: list = field(default_factory=list)   # (seconds since the sorts started, read transactions/s)
    first_death_at: float | None = None  # seconds after the sorts started: the first database process death
    server_pid: int = 0                # the postmaster / mariadbd when the load started
    session_ids: set = field(default_factory=set)   # every id the large queries' sessions had (the server's)
    sessions_peak_bytes: int = 0       # MariaDB: the most its sessions held at once, by its own accounting
    oom_victims: list = field(default_factory=list)  # (pid, comm) of the kernel's OOM kills, from /dev/kmsg

    @property
    def limit_reached_wall(self) -> float | None:
        return None if self.limit_reached_at is None else self.load_started_wall + self.limit_reached_at

    def level_changes(self) -> list[tuple[float, str]]:
        """(seconds after the sorts started, "ok -> warn") of dbguard's audited level changes: the
        audit's stamp is taken after the reading that changed the level, so it is never early."""
        return [(float(a["ts"]) - self.load_started_wall, str(a.get("result", ""))) for a in self.audit
                if a.get("action") == "level_change"]

    @property
    def left_ok_at(self) -> float | None:
        """Seconds after the sorts started when dbguard's level first left ok (None: never)."""
        return next((t for t, change in self.level_changes() if change.startswith("ok -> ")), None)

    def summary(self) -> str:
        lines = [f"guard={self.guard}: survived={self.database_survived} crash_recoveries={self.crash_recoveries} "
                 f"oom_kills={self.oom_kills} pgbench ok={self.transactions_ok} failed={self.transactions_failed} "
                 f"lost={self.sessions_lost} large: finished={self.large.finished} cancelled={self.large.cancelled} "
                 f"terminated={self.large.terminated} refused={self.large.refused} failed={self.large.failed} "
                 f"peak={self.peak_bytes // MiB}/{self.limit_bytes // MiB} MiB "
                 f"sessions_held={self.sessions_peak_bytes // MiB} MiB limit_reached_at={self.limit_reached_at} "
                 f"oom_victims={self.oom_victims} left_ok_at={self.left_ok_at}"]
        lines += [f"  {t:+9.3f}s  dbguard level {change}" for t, change in self.level_changes()[:10]]
        lines += [f"  {e}" for e in self.timeline]
        lines += [f"  large query: {e}" for e in self.large.errors[:8]]
        lines += [f"  pgbench: {e}" for e in self.pgbench_errors[:3]]
        if self.server_log_excerpt:
            lines.append("  server log:\n    " + self.server_log_excerpt.replace("\n", "\n    "))
        acts = [a for a in self.audit if a.get("action") not in ("set_oom_score_adj", "start")]
        lines += [f"  audit: {a.get('action')} {a.get('path', '')} {a.get('target', '')}: {a.get('reason', '')} "
                  f"-> {a.get('result', '')}" for a in acts[:30]]
        return "\n".join(lines)


def run_pg_sessions(guard: str | Guard = "none", *, limit: int = 900 * MiB, shared_buffers: str = "200MB",
                    work_mem: str = "96MB", sessions: int = 12, clients: int = 2, scale: int = 10,
                    duration: int = 30, warmup: float = 3.0, extra_config: dict | None = None,
                    log: Callable[[str], None] | None = None) -> SessionsResult:
    """Run the scenario once (see the module docstring). pgbench runs `-S -c clients` for
    `warmup + duration` s; the sorting sessions start `warmup` s in and run `duration` s."""
    from lab.pgcluster import PgCluster

    require_lab()
    guard_name, guard_cm = _resolve_guard(guard)
    say = log or (lambda msg: None)
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-sessions-{guard_name}-"))
    audit_path = workdir / "audit.jsonl"
    run = None
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(4096 * MiB))
            cluster = stack.enter_context(PgCluster(settings={"shared_buffers": shared_buffers,
                                                              "work_mem": work_mem}, cgroup=cg))
            cluster.pgbench_init(scale)
            cluster.psql("SELECT count(*) FROM pgbench_accounts")      # the table into shared buffers
            cg.set_limit(limit)
            say(f"[{guard_name}] PostgreSQL loaded; limit {limit // MiB} MiB, usage {cg.usage() // MiB} MiB")
            postmaster = cluster.postmaster_pid()
            env = ScenarioEnv(cg, cluster, workdir, audit_path, lambda m: say(f"[{guard_name}] {m}"))
            if guard_name == "dbguard":
                run = stack.enter_context(dbguard_guard(env, extra_config=extra_config))
            else:
                stack.enter_context(guard_cm(env))
            kmsg = stack.enter_context(contextlib.closing(Kmsg()))
            t_bench = time.monotonic()
            pgbench = cluster.pgbench("-S", "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                                      str(int(warmup + duration)), "-P", "1", "--no-vacuum")
            time.sleep(warmup)
            t0, t0_wall = time.monotonic(), time.time()
            watcher = Watcher(cg, t0, kills_until=t0 + duration, load="the sorts")
            watcher.start()
            load = SortLoad(lambda: psycopg.connect(cluster.dsn, autocommit=True), PG_SORT, sessions, pg_classify,
                            ident="SELECT pg_backend_pid()")
            load.start()
            say(f"[{guard_name}] {sessions} sorting sessions started")
            time.sleep(duration)
            counts = load.stop()
            watcher.note("sorts stopped")
            try:
                stdout, stderr = pgbench.communicate(timeout=60)
            except Exception:
                pgbench.kill()
                stdout, stderr = pgbench.communicate()
            watcher.stop()
            guard_running = run.running() if run is not None else None
            time.sleep(1.0)
            survived = cluster.is_up() and _alive(postmaster)
            bench = parse_pgbench(_text(stdout), _text(stderr))
            server_log = cluster.log()
            result = SessionsResult(
                guard=guard_name, database_survived=survived, crash_recoveries=count_crash_recoveries(server_log),
                server_pid=postmaster, session_ids=set(load.ids), oom_victims=kmsg_oom_victims(kmsg.read(), cg.relpath),
                oom_kills=cg.oom_kills(), transactions_ok=bench.transactions_ok,
                transactions_failed=bench.transactions_failed, sessions_lost=bench.sessions_lost, large=counts,
                peak_bytes=cg.peak(), limit_bytes=limit, limit_reached_at=watcher.limit_reached,
                audit=audit_records(audit_path), server_log_excerpt=crash_excerpt(server_log),
                pgbench_errors=bench.errors[:10], timeline=watcher.timeline, guard_running=guard_running,
                load_started_wall=t0_wall, load_started_monotonic=t0, first_death_at=watcher.first_kill,
                progress=[(t - (t0 - t_bench), tps) for t, tps in bench.progress])
        if run is not None:              # stopped by now: its whole output
            result.guard_output = run.output(200_000)
        say(result.summary())
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    from lab.procs import alive
    return alive(pid)


def _text(b) -> str:
    return "" if b is None else b if isinstance(b, str) else b.decode(errors="replace")


# --- MariaDB ---------------------------------------------------------------------------------
# Sixteen connections over 400,000 wide rows. Half sort them with a 160 MB sort_buffer_size:
# each sort fills its buffer, writes its merge runs to temporary files in tmpdir and merges
# them. The other half make every row distinct in an in-memory (HEAP) temporary table, which
# tmp_table_size lets grow to 256 MB before it would go to disk.
MARIADB_ROWS = 400_000
MARIADB_SORT = (f"SELECT id, pad FROM w.t ORDER BY CONCAT(pad, id) DESC LIMIT 1 OFFSET {MARIADB_ROWS - 10}")
MARIADB_TEMP_TABLE = "SELECT COUNT(*) FROM (SELECT DISTINCT CONCAT(pad, id) k FROM w.t) s"
MARIADB_SETTINGS = {"sort_buffer_size": "160M", "tmp_table_size": "256M", "max_heap_table_size": "256M",
                    "max_connections": 64}
ER_QUERY_INTERRUPTED = 1317        # KILL QUERY
ER_CONNECTION_KILLED = 1927        # KILL CONNECTION
ER_OPTION_PREVENTS_STATEMENT = 1290  # "... running with the --max-session-mem-used=N option": the cap
# KILL CONNECTION of a session in the middle of a statement reaches its client as a dropped
# socket, not as 1927; a crashed server looks the same, which the callers rule out by the
# server's pid and the audit's KILL CONNECTION records.
CR_SERVER_LOST = 2013


def mariadb_classify(e: Exception) -> str:
    code = e.args[0] if getattr(e, "args", None) else None
    if code == ER_QUERY_INTERRUPTED:
        return "cancelled"
    if code in (ER_CONNECTION_KILLED, CR_SERVER_LOST):
        return "terminated"
    if code == ER_OPTION_PREVENTS_STATEMENT and "max-session-mem-used" in str(e):
        return "refused"
    return "failed"


def run_mariadb_sessions(guard: str | Guard = "none", *, limit: int = 900 * MiB, sessions: int = 16,
                         statements: tuple[str, ...] = (MARIADB_SORT, MARIADB_TEMP_TABLE), clients: int = 2,
                         duration: int = 30, warmup: float = 3.0, dry_run: bool = False,
                         settings: dict | None = None, extra_config: dict | None = None,
                         log: Callable[[str], None] | None = None) -> SessionsResult:
    """The MariaDB variant: read clients (lab.mariadb.ReadLoad) instead of pgbench; the
    result's transactions are their queries, its crash recoveries the server's restarts
    (a killed mariadbd is not restarted here: `database_survived` says it, with the same pid).
    Session i runs `statements[i % len(statements)]`. `dry_run`: dbguard runs with --dry-run
    (it decides and records, changes nothing: the control that keeps dbguard's eyes)."""
    import pymysql

    from lab import require
    from lab.mariadb import MariaDB, ReadLoad, SessionMemory, load_table

    require.root("the sessions scenario (memory cgroups, oom counters)")
    require.memory_cgroups()
    require.mariadb()
    guard_name, guard_cm = _resolve_guard(guard)
    say = log or (lambda msg: None)
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-sessions-mariadb-{guard_name}-"))
    audit_path = workdir / "audit.jsonl"
    run = None
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(4096 * MiB))
            db = stack.enter_context(MariaDB(settings={**MARIADB_SETTINGS, **(settings or {})}, cgroup=cg))
            load_table(db, MARIADB_ROWS)
            db.value("SELECT COUNT(*) FROM w.t")
            db.grant_dbguard()
            cg.set_limit(limit)
            server = db.pid()
            say(f"[{guard_name}] MariaDB loaded; limit {limit // MiB} MiB, usage {cg.usage() // MiB} MiB")
            env = ScenarioEnv(cg, db, workdir, audit_path, lambda m: say(f"[{guard_name}] {m}"))
            if guard_name == "dbguard":
                run = stack.enter_context(dbguard_guard(env, extra_config=extra_config,
                                                        extra_args=("--dry-run",) if dry_run else ()))
            else:
                stack.enter_context(guard_cm(env))
            kmsg = stack.enter_context(contextlib.closing(Kmsg()))
            reads = ReadLoad(db, MARIADB_ROWS, clients=clients, reconnect=False).start()
            time.sleep(warmup)
            t0, t0_wall = time.monotonic(), time.time()
            watcher = Watcher(cg, t0, kills_until=t0 + duration, load="the sorts")
            watcher.watch_process(server, f"mariadbd (pid {server})")
            watcher.start()
            asked = SessionMemory(db)
            asked.start()
            kw = db.connect_kwargs()
            load = SortLoad(lambda: pymysql.connect(**kw), statements, sessions, mariadb_classify,
                            ident="SELECT CONNECTION_ID()").start()
            say(f"[{guard_name}] {sessions} sorting sessions started")
            time.sleep(duration)
            counts = load.stop()
            watcher.note("sorts stopped")
            sessions_peak = asked.stop()
            summary = reads.stop()
            watcher.stop()
            guard_running = run.running() if run is not None else None
            survived = db.proc.poll() is None and _alive(server)
            result = SessionsResult(
                guard=guard_name + (" --dry-run" if dry_run else ""), database_survived=survived,
                crash_recoveries=0 if survived else 1, server_pid=server, session_ids=set(load.ids),
                oom_victims=kmsg_oom_victims(kmsg.read(), cg.relpath),
                oom_kills=cg.oom_kills(), transactions_ok=summary.queries_ok,
                transactions_failed=summary.queries_failed, sessions_lost=summary.sessions_lost, large=counts,
                peak_bytes=cg.peak(), limit_bytes=limit, limit_reached_at=watcher.limit_reached,
                audit=audit_records(audit_path), server_log_excerpt=db.log_tail(15) if not survived else "",
                pgbench_errors=summary.errors[:10], timeline=watcher.timeline, guard_running=guard_running,
                load_started_wall=t0_wall, load_started_monotonic=t0, first_death_at=watcher.first_kill,
                progress=[(t - (t0 - reads.t_start), qps) for t, qps in summary.progress],
                sessions_peak_bytes=sessions_peak)
        if run is not None:
            result.guard_output = run.output(200_000)
        say(result.summary())
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
