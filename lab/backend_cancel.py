"""One PostgreSQL client backend allocating past a small memory cgroup's limit, under dbguard.

PostgreSQL 15 (shared_buffers=32MB, no parallel workers) in a memory cgroup of `limit`; one
client sets a large work_mem and runs a sort that wants more than the limit holds. dbguard
runs with [bpf] cancel on and its user-space session answer out of reach (runaway_min_bytes
far above the limit), so a cancel can come from the kernel alone: SIGINT to the allocating
backend at its failing-reclaim streak.

    r = run_backend_cancel()               # the kernel cancels the statement
    r = run_backend_cancel(kernel_cancel=None)    # [bpf] cancel as the config's default leaves it
    r = run_backend_cancel(dry_run=True)   # dbguard --dry-run: recorded, nothing sent
    r = run_backend_cancel(kernel_cancel=False)   # [bpf] cancel off, user space as by default
    r = run_backend_cancel(repeat=2)       # the backend runs the statement twice: a streak each

Used by tests/e2e/test_bpf_cancel.py. What happened is read from the client's own error, the
server log, the postmaster's pid and the cgroup's counters, beside dbguard's audit log.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab.cgroup import MemoryCgroup
from lab.pgoutput import count_crash_recoveries
from lab.procs import alive
from lab.scenario import ScenarioEnv, dbguard_guard, require_lab
from lab.sessions import CANCELLED

MiB = 1024 * 1024

# 20M rows of (int, md5 text) into one in-memory sort: ~2.5 GB wanted, in 64 MB slices.
SORT = "SELECT count(*) FROM (SELECT g, md5(g::text) m FROM generate_series(1, 20000000) g ORDER BY m) s"
# What a SIGINT to the postmaster (a fast shutdown) or a crash writes to the server log.
SHUTDOWN = re.compile(r"received (fast|smart|immediate) shutdown request|terminating any other active server "
                      r"processes|was terminated by signal|reinitializing|database system is shut down|"
                      r"shutting down")


@dataclass
class CancelResult:
    dry_run: bool
    client_error: str | None          # the first backend's statement's error as its client saw it; None: finished
    seconds: float                    # how long the first backend's statement ran
    backend_pid: int                  # the first backend
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
    client_errors: dict[int, str | None] = field(default_factory=dict)   # every backend: pid -> its first error
    statements: list[tuple[int, str | None]] = field(default_factory=list)  # (backend, its error) of each run
    durations: list[float] = field(default_factory=list)    # each run's seconds, start to end, as the client saw them

    @property
    def cancelled(self) -> bool:
        return self.client_error is not None and CANCELLED in self.client_error

    @property
    def statements_cancelled(self) -> list[bool]:
        """Whether each statement run ended with PostgreSQL's cancel, in the order they ran."""
        return [e is not None and CANCELLED in e for _, e in self.statements]

    @property
    def backend_pids(self) -> set[int]:
        return set(self.client_errors) or {self.backend_pid}

    def summary(self) -> str:
        lines = [f"dry_run={self.dry_run} client_errors={self.client_errors} first after {self.seconds:.2f}s "
                 f"backend={self.backend_pid} postmaster={self.postmaster_pid} alive={self.postmaster_alive} "
                 f"accepts={self.accepts} crash_recoveries={self.crash_recoveries} oom_kills={self.oom_kills} "
                 f"peak={self.peak_bytes // MiB}/{self.limit_bytes // MiB} MiB guard_running={self.guard_running}"]
        lines += [f"  audit: {a.get('action')} {a.get('path')} pid={a.get('pid')} {a.get('reason', '')} -> "
                  f"{a.get('result', '')}" for a in self.audit if a.get("action") not in ("set_oom_score_adj",)][:20]
        lines.append(f"  other server processes: {self.server_pids}")
        lines += [f"  server log: {x}" for x in self.shutdown_lines[:10]]
        lines += self.notes
        return "\n".join(lines)


def run_backend_cancel(*, dry_run: bool = False, kernel_cancel: bool | None = True, limit: int = 300 * MiB,
                       sql: str = SORT, work_mem: str = "4GB", interval: float = 0.25, backends: int = 1,
                       repeat: int = 1, bpf: dict | None = None, user_answer: bool | None = None,
                       during: contextlib.AbstractContextManager | None = None, log: Callable[[str], None] | None = None) -> CancelResult:
    """`kernel_cancel`: [bpf] cancel (None: the key left out, the default). `bpf`: more [bpf]
    keys (cancel_interval, ...). `backends`: clients running `sql` at once, each its own
    backend, `repeat` times one after another. `user_answer`: the user-space session answer
    in reach (default: only when the kernel's cancel is off). `during`: a context (a signal
    tracer) entered just before the statements start and left once they ended, before dbguard
    and the server stop (pg_ctl's fast shutdown is a SIGINT to the postmaster)."""
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
            keys = {"enabled": True, **({} if kernel_cancel is None else {"cancel": kernel_cancel}), **(bpf or {})}
            extra = {"bpf": keys, "general": {"interval": interval}, "metrics": {"listen": f"127.0.0.1:{port}"}}
            in_reach = kernel_cancel is False if user_answer is None else user_answer
            run = stack.enter_context(dbguard_guard(env, extra_config=extra, extra_args=("--dry-run",) if dry_run else (),
                                                    database={} if in_reach else {"runaway_min_bytes": "1TiB"}))
            conns = [stack.enter_context(psycopg.connect(cluster.dsn, autocommit=True)) for _ in range(backends)]
            pids = []
            for conn in conns:
                conn.execute(f"SET work_mem = '{work_mem}'")
                pids.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
            others = {int(p): str(t) for p, t in conns[0].execute(
                "SELECT pid, backend_type FROM pg_stat_activity WHERE NOT pid = ANY(%s)", (pids,)).fetchall()}
            # dbguard has seen the backends (its own and these shielded, from pg_stat_activity),
            # then a few cycles more for the maps.
            run.wait_for(lambda: _shielded_backends(port) >= 1 + backends, 30, "the backends shielded (metrics)")
            time.sleep(4 * interval)
            say(f"[bpfcancel] backends {pids} sorting in {limit // MiB} MiB (dry run: {dry_run})")
            with during if during is not None else contextlib.nullcontext():
                t0 = time.monotonic()
                ends = _run_all(conns, sql, repeat)
                time.sleep(2 * interval + 1.0)  # the kernel's events drained, the server's log written
            backend, (error, _, seconds) = pids[0], ends[0][0]
            accepts = _accepts(cluster.dsn)
            server_log = cluster.log()
            result = CancelResult(
                dry_run=dry_run, client_error=error, seconds=seconds - t0, backend_pid=backend,
                client_errors={pid: runs[0][0] for pid, runs in zip(pids, ends)},
                statements=[(pid, e) for pid, runs in zip(pids, ends) for e, _, _ in runs],
                durations=[end - start for runs in ends for _, start, end in runs], postmaster_pid=postmaster,
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


def _run_all(conns: list, sql: str, repeat: int) -> list[list[tuple[str | None, float, float]]]:
    """Runs `sql` on every connection at once, `repeat` times on each; per connection, per run
    (its error as the client saw it, or None; time.monotonic() at its start and at its end)."""
    ends: list[list[tuple[str | None, float, float]]] = [[] for _ in conns]

    def one(i: int) -> None:
        for _ in range(repeat):
            error, start = None, time.monotonic()
            try:
                conns[i].execute(sql).fetchall()
            except Exception as e:          # noqa: BLE001 - the client's own words are the result
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ends[i].append((error, start, time.monotonic()))

    threads = [threading.Thread(target=one, args=(i,), name=f"sort-{i}") for i in range(len(conns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return ends


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

