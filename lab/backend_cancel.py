"""One PostgreSQL client backend allocating past a small memory cgroup's limit, under dbguard.

PostgreSQL 15 (shared_buffers=32MB, no parallel workers) in a memory cgroup of `limit`; one
client sets a large work_mem and runs a sort that wants more than the limit holds. dbguard
runs with [bpf] cancel on and its user-space session answer out of reach (runaway_min_bytes
far above the limit), so a cancel can come from the kernel alone: SIGINT to the allocating
backend at its failing-reclaim streak.

    r = run_backend_cancel()               # the kernel cancels the statement
    r = run_backend_cancel(dry_run=True)   # dbguard --dry-run: recorded, nothing sent
    r = run_backend_cancel(kernel_cancel=False)   # [bpf] cancel off, user space as by default

Used by tests/e2e/test_bpf_cancel.py. What happened is read from the client's own error, the
server log, the postmaster's pid and the cgroup's counters, beside dbguard's audit log.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab.cgroup import MemoryCgroup
from lab.pgoutput import count_crash_recoveries
from lab.procs import alive
from lab.scenario import ScenarioEnv, dbguard_guard, require_lab

MiB = 1024 * 1024

# 20M rows of (int, md5 text) into one in-memory sort: ~2.5 GB wanted, in 64 MB slices.
SORT = "SELECT count(*) FROM (SELECT g, md5(g::text) m FROM generate_series(1, 20000000) g ORDER BY m) s"
CANCELLED = "canceling statement due to user request"
# What a SIGINT to the postmaster (a fast shutdown) or a crash writes to the server log.
SHUTDOWN = re.compile(r"received (fast|smart|immediate) shutdown request|terminating any other active server "
                      r"processes|was terminated by signal|reinitializing|database system is shut down|"
                      r"shutting down")


@dataclass
class CancelResult:
    dry_run: bool
    client_error: str | None          # the statement's error as the client saw it; None: it finished
    seconds: float                    # how long the statement ran
    backend_pid: int
    postmaster_pid: int
    server_pids: dict[int, str]       # every other server process at the start: pid -> title
    postmaster_alive: bool
    accepts: bool                     # a new connection runs SELECT 1 afterwards
    crash_recoveries: int
    shutdown_lines: list[str]
    oom_kills: int
    peak_bytes: int
    limit_bytes: int
    audit: list[dict]
    guard_running: bool
    guard_output: str = ""
    server_log_tail: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.client_error is not None and CANCELLED in self.client_error

    def summary(self) -> str:
        lines = [f"dry_run={self.dry_run} client_error={self.client_error!r} after {self.seconds:.2f}s "
                 f"backend={self.backend_pid} postmaster={self.postmaster_pid} alive={self.postmaster_alive} "
                 f"accepts={self.accepts} crash_recoveries={self.crash_recoveries} oom_kills={self.oom_kills} "
                 f"peak={self.peak_bytes // MiB}/{self.limit_bytes // MiB} MiB guard_running={self.guard_running}"]
        lines += [f"  audit: {a.get('action')} {a.get('path')} pid={a.get('pid')} {a.get('reason', '')} -> "
                  f"{a.get('result', '')}" for a in self.audit if a.get("action") not in ("set_oom_score_adj",)][:20]
        lines += [f"  server log: {x}" for x in self.shutdown_lines[:10]]
        lines += self.notes
        return "\n".join(lines)


def run_backend_cancel(*, dry_run: bool = False, kernel_cancel: bool = True, limit: int = 300 * MiB,
                       sql: str = SORT, work_mem: str = "4GB", interval: float = 0.25,
                       log: Callable[[str], None] | None = None) -> CancelResult:
    import psycopg
    from lab.pgcluster import PgCluster, free_port

    require_lab()
    say = log or (lambda msg: None)
    workdir = Path(tempfile.mkdtemp(prefix="dbguard-bpfcancel-"))
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(4096 * MiB))
            cluster = stack.enter_context(PgCluster(settings={"shared_buffers": "32MB",
                                                              "max_parallel_workers_per_gather": "0"}, cgroup=cg))
            cg.set_limit(limit)
            postmaster = cluster.postmaster_pid()
            env = ScenarioEnv(cg, cluster, workdir, workdir / "audit.jsonl", lambda m: say(f"[bpfcancel] {m}"))
            port = free_port()
            extra = {"bpf": {"enabled": True, "cancel": kernel_cancel}, "general": {"interval": interval},
                     "metrics": {"listen": f"127.0.0.1:{port}"}}
            run = stack.enter_context(dbguard_guard(env, extra_config=extra, extra_args=("--dry-run",) if dry_run else (),
                                                    database={"runaway_min_bytes": "1TiB"} if kernel_cancel else {}))
            conn = stack.enter_context(psycopg.connect(cluster.dsn, autocommit=True))
            conn.execute(f"SET work_mem = '{work_mem}'")
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            others = {int(p): str(t) for p, t in conn.execute(
                "SELECT pid, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()").fetchall()}
            # dbguard has seen the backend (its own and this one shielded, from pg_stat_activity),
            # then a few cycles more for the maps.
            run.wait_for(lambda: _shielded_backends(port) >= 2, 30, "both backends shielded (metrics)")
            time.sleep(4 * interval)
            say(f"[bpfcancel] backend {backend} sorting in {limit // MiB} MiB (dry run: {dry_run})")
            t0 = time.monotonic()
            error = None
            try:
                conn.execute(sql).fetchall()
            except Exception as e:          # noqa: BLE001 - the client's own words are the result
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            seconds = time.monotonic() - t0
            time.sleep(2 * interval + 1.0)  # the kernel's events drained, the server's log written
            accepts = _accepts(cluster.dsn)
            server_log = cluster.log()
            result = CancelResult(
                dry_run=dry_run, client_error=error, seconds=seconds, backend_pid=backend, postmaster_pid=postmaster,
                server_pids=others, postmaster_alive=alive(postmaster) and cluster.postmaster_pid() == postmaster,
                accepts=accepts, crash_recoveries=count_crash_recoveries(server_log),
                shutdown_lines=[ln for ln in server_log.splitlines() if SHUTDOWN.search(ln)],
                oom_kills=cg.oom_kills(), peak_bytes=cg.peak(), limit_bytes=limit, audit=run.audit(),
                guard_running=run.running(), server_log_tail="\n".join(server_log.splitlines()[-15:]))
        result.guard_output = run.output(20_000)
        say(result.summary())
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _shielded_backends(port: int) -> float:
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0
    m = re.search(r'^dbguard_shielded_processes\{role="pg_backend"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0


def _accepts(dsn: str) -> bool:
    import psycopg
    try:
        with psycopg.connect(dsn, connect_timeout=5) as c:
            return c.execute("SELECT 1").fetchone()[0] == 1
    except Exception:                      # noqa: BLE001 - down is the answer
        return False

