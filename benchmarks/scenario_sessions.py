"""Scenario 5, sessions and sessions-mariadb: the database as its own hog (lab/sessions.py).

Many sessions sorting at once, no outside process: PostgreSQL (12 sorts, work_mem=96MB,
shared_buffers=200MB, pgbench -S -c 2 beside them) or MariaDB (16 sessions: 8 sorts with
sort_buffer_size=160M, merge runs to temporary files, 8 in-memory temporary tables; two
range-read clients) in a 900 MB cgroup. Recorded beside the
usual figures: how the large queries ended (finished, cancelled, terminated, failed: by the
clients' own errors), and the time from the cgroup first reaching its limit (the first
reclaim that could not stay under it) to the guard's first session end, by path (user: SQL
from user space; bpf: SIGINT from the kernel, PostgreSQL only, from the guard's audit). For
PostgreSQL a tracer of every SIGINT (benchmarks/reclaim_latency.py, Tracer(sig=2)) also times
each cancel delivered to a sorting backend from the start of its streak of reclaims that freed
nothing, by who sent it, whatever the guard's audit says.
"""
from __future__ import annotations

import time

from lab.sessions import SessionsResult, run_mariadb_sessions, run_pg_sessions

from .contenders import Contender, sampled
from .reclaim_latency import VERSION, Tracer
from .record import Log, Params, pressure_record
from .tables import carried_out

PATHS = ("user", "bpf")


def first_end_by_path(audit: list[dict], load_started_wall: float, limit_at: float | None) -> dict[str, float | None]:
    """Per path, seconds from the cgroup first reaching its limit to the guard's first session
    end carried out on that path (negative: before the limit; None: none, or no limit reached)."""
    out: dict[str, float | None] = {}
    for path in PATHS:
        ts = [float(a["ts"]) - load_started_wall for a in audit if a.get("action") in ("cancel_query", "terminate_session")
              and a.get("path", "user") == path and carried_out(a)]
        out[path] = round(min(ts) - limit_at, 4) if ts and limit_at is not None else None
    return out


def _record(p: Params, sink: dict, r: SessionsResult, wall_minus_mono: float) -> dict:
    ends = sorted(float(a["ts"]) - r.load_started_wall for a in r.audit
                  if a.get("action") in ("cancel_query", "terminate_session"))
    firsts = [x for x in (ends[0] if ends else None, r.first_death_at) if x is not None]
    return pressure_record(
        p, sink, r.load_started_monotonic, wall_minus_mono, progress=r.progress, audit=r.audit,
        timeline=r.timeline, limit_at=r.limit_reached_at, first_kill=min(firsts) if firsts else None,
        db_deaths=[], db_survived=r.database_survived, crash_recoveries=r.crash_recoveries,
        sessions_lost=r.sessions_lost, tx_ok=r.transactions_ok, tx_failed=r.transactions_failed,
        client_errors=r.pgbench_errors[:5], kernel_oom_kills=r.oom_kills,
        large_finished=r.large.finished, large_cancelled=r.large.cancelled,
        large_terminated=r.large.terminated, large_failed=r.large.failed,
        first_session_end_at=ends[0] if ends else None, server_log=r.server_log_excerpt,
        limit_to_first_end_s=first_end_by_path(r.audit, r.load_started_wall, r.limit_reached_at))


def sessions(c: Contender, p: Params, log: Log) -> dict:
    sink: dict = {}
    wall_minus_mono = time.time() - time.monotonic()
    with Tracer(sig=2) as tracer:
        r = run_pg_sessions(sampled(c, sink), duration=p.duration - int(p.warmup), warmup=p.warmup, log=log)
    lat = tracer.latencies.of(r.session_ids)
    return {**_record(p, sink, r, wall_minus_mono), "reclaim_to_cancel": lat.summary("cancels"),
            "reclaim_to_cancel_ms": lat.ms, "tracer": VERSION}


def sessions_mariadb(c: Contender, p: Params, log: Log) -> dict:
    sink: dict = {}
    wall_minus_mono = time.time() - time.monotonic()
    r = run_mariadb_sessions(sampled(c, sink), duration=p.duration - int(p.warmup), warmup=p.warmup, log=log)
    return _record(p, sink, r, wall_minus_mono)
