"""Scenario 2b, fast-hogs (issue #19): PostgreSQL 15 (shared_buffers 400MB, pgbench -S -c 4
running) in a 900 MB cgroup, and round after round six processes started together, each
allocating 110 MB as fast as it can (lab.fasthogs, as tests/e2e/test_fast_hogs.py). One run is
`Params.rounds` rounds on one cluster under one guard. Per round: the kernel's OOM kills (the
cgroup's counter, the kernel log), crash recoveries (the server log), the server up, the kills
by path; over the run, the time from each killed hog's first failing reclaim to its SIGKILL,
by path (benchmarks/reclaim_latency.py: a tracer of its own, the same for every contender)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from lab.fasthogs import HOGS, kills_by_path, one_round, postgres_side
from lab.launcher import audit_records
from lab.pgoutput import count_crash_recoveries, crash_excerpt, parse_pgbench
from lab.watch import Kmsg

from .contenders import Contender
from .reclaim_latency import VERSION, Tracer
from .record import Log, Params, kill_actions


def fast_hogs(c: Contender, p: Params, log: Log) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-fasthogs-{c.name}-"))
    try:
        with contextlib.ExitStack() as stack:
            pg = stack.enter_context(postgres_side(workdir, c.for_env(), lambda m: log(f"[{c.name}] {m}"),
                                                   warmup=p.warmup))
            tracer = stack.enter_context(Tracer())
            kmsg = stack.enter_context(contextlib.closing(Kmsg()))
            rounds = []
            for i in range(p.rounds):
                before = pg.crash_recoveries()
                r = one_round(pg.cgroup, workdir, str(i), kmsg)
                rounds.append({"pids": r.pids, "killed": r.killed, "kernel_oom_kills": r.oom_kills,
                               "kmsg_victims": r.kmsg_victims, "seconds": r.seconds,
                               "crash_recoveries": pg.crash_recoveries() - before,
                               "server_up": pg.server_up(), "pgbench_running": pg.bench.poll() is None})
                log(f"[{c.name}] round {i + 1}/{p.rounds}: {r.killed} hogs killed, kernel OOM kills {r.oom_kills}, "
                    f"crash recoveries {rounds[-1]['crash_recoveries']}")
            out, err = pg.stop_bench()
            survived = pg.server_up()
            server_log = pg.cluster.log()
        # The tracer is closed now: its kills are timed.
        audit = audit_records(workdir / "audit.jsonl")
        for r in rounds:
            lat = tracer.latencies.of(r["pids"])
            r["kills"] = {path: v["kills"] for path, v in lat.summary().items()}
            r["guard_kills"] = kills_by_path(audit, r["pids"])
        pgb = parse_pgbench(out, err)
        return {
            "rounds": rounds,
            "db_survived": survived,
            "crash_recoveries": count_crash_recoveries(server_log),
            "server_log": crash_excerpt(server_log),
            "sessions_lost": pgb.sessions_lost,
            "hogs": HOGS * p.rounds,
            "hogs_killed": sum(r["killed"] for r in rounds),
            "kernel_oom_kills": sum(r["kernel_oom_kills"] for r in rounds),
            "rounds_with_kernel_oom_kill": sum(bool(r["kernel_oom_kills"] or r["kmsg_victims"]) for r in rounds),
            "rounds_with_crash_recovery": sum(bool(r["crash_recoveries"]) for r in rounds),
            "rounds_with_bpf_kill": sum(bool(r["kills"].get("bpf")) for r in rounds),
            "guard_actions": kill_actions(audit),
            "tracer": VERSION,          # benchmarks/reclaim_latency.py: episode start -> SIGKILL sent
            "tracer_lost_events": tracer.latencies.lost,
            "reclaim_to_kill": tracer.latencies.summary(),
            "reclaim_to_kill_ms": tracer.latencies.ms,
            "reclaim_to_first_kill_ms": tracer.latencies.first_ms,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
