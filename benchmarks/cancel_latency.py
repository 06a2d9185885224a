"""From a PostgreSQL backend's first failing reclaim to its cancel, in the kernel and from user
space (issue #18).

One client backend sorts past a small memory cgroup's limit (lab/backend_cancel.py: 300 MB,
work_mem=4GB, 20M rows) under `dbguard run`, `--runs` times per path, interleaved:

    bpf   [bpf] cancel = true and the user-space answer out of reach (runaway_min_bytes 1TiB):
          the kernel sends SIGINT at the backend's failing-reclaim streak
    user  [bpf] cancel = false, the defaults otherwise: pg_cancel_backend from user space at
          level high (the kernel's kill path on, as by default)

Timed by benchmarks/reclaim_latency.py's tracer (Tracer(sig=2)), not by dbguard: from the start
of the failing episode of the backend's memory cgroup to the sending of its SIGINT; a SIGINT
that came before any failing reclaim of the backend is counted apart. Also recorded: how the
statement ended (the client's own error), kernel OOM kills and crash recoveries.

    sudo .venv/bin/python -m benchmarks.cancel_latency --runs 3
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from .reclaim_latency import TIMED_ALIKE, VERSION
from .record import Standalone, grouped, recorded

HERE = Path(__file__).resolve().parent
TITLE = "The cancel: first failing reclaim → SIGINT, in the kernel and from user space (issue #18)"
PATHS = ("bpf", "user")
# lab.backend_cancel's scenario, as both cancel benchmarks' reports say it.
SORTING = "One PostgreSQL 15 client backend sorting 20M rows with work_mem=4GB in a 300 MB memory cgroup"


def one(path: str) -> dict:
    from lab.backend_cancel import run_backend_cancel
    from .reclaim_latency import Tracer
    with Tracer(sig=2) as tracer:
        r = run_backend_cancel(kernel_cancel=path == "bpf")
    mine = [(k.path, k.ms) for k in tracer.latencies.of({r.backend_pid}).kills]
    return {"path": path, "tracer": VERSION, "outcome": r.client_error or "finished", "cancelled": r.cancelled,
            "seconds": round(r.seconds, 3), "kernel_oom_kills": r.oom_kills, "crash_recoveries": r.crash_recoveries,
            "sigint_ms": [ms for _, ms in mine if ms is not None],
            "sigint_before_failing_reclaim": sum(1 for _, ms in mine if ms is None),
            "sigint_paths": sorted({p for p, _ in mine}),
            "audit_cancels": [f"{a.get('path')}: {a.get('result')}" for a in r.audit if a.get("action") == "cancel_query"]}


def _timed(runs: list[dict]) -> str:
    """What the SIGINT ms are: runs recorded before the tracer's fix (issue #19) were timed otherwise."""
    if all(r.get("tracer") in TIMED_ALIKE for r in runs):
        return ("from the start of the failing episode of the backend's memory cgroup (its first reclaim that "
                "freed nothing) to the sending of its SIGINT")
    return ("by the tracer before its fix of issue #19: from the end of the backend's first reclaim that freed "
            "nothing to the delivery of its SIGINT")


def body(data: dict) -> list[str]:
    runs = data["results"]
    lines = [recorded(data) + " "
             f"({data['runs']} runs per path, interleaved). {SORTING} (lab/backend_cancel.py, as "
             "tests/e2e/test_bpf_cancel.py). bpf: `[bpf] cancel = true`, the user-space session answer out of reach; "
             "user: `[bpf] cancel = false`, pg_cancel_backend at level high. Timed by benchmarks/reclaim_latency.py "
             f"(Tracer(sig=2)), not by dbguard: {_timed(runs)}.", "",
             "| path | runs | statement cancelled | kernel OOM kills | crash recoveries | SIGINTs timed | first failing "
             "reclaim → SIGINT delivered, median | max | SIGINTs before any failing reclaim |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path, mine in grouped(runs, "path", PATHS):
        ms = sorted(x for r in mine for x in r["sigint_ms"])
        lines.append(f"| {path} | {len(mine)} | {sum(r['cancelled'] for r in mine)} | "
                     f"{sum(r['kernel_oom_kills'] for r in mine)} | {sum(r['crash_recoveries'] for r in mine)} | {len(ms)} | "
                     f"{f'{statistics.median(ms):.2f} ms' if ms else '–'} | {f'{ms[-1]:.2f} ms' if ms else '–'} | "
                     f"{sum(r['sigint_before_failing_reclaim'] for r in mine)} |")
    lines += ["", *[f"- {r['path']}: {r['outcome']} after {r['seconds']} s; kernel OOM kills {r['kernel_oom_kills']}; "
                    f"SIGINT ms {r['sigint_ms']}; audit {r['audit_cancels']}" for r in runs], ""]
    return lines


RECORD = Standalone("cancel_latency", TITLE, HERE / "cancel-latency.json", HERE / "CANCEL-RESULTS.md", body)
section = RECORD.section


def main(argv: list[str] | None = None) -> int:
    return RECORD.main_repeated(argv, __doc__, PATHS, one, lambda r: f"{r['outcome']}; SIGINT ms {r['sigint_ms']}")


if __name__ == "__main__":
    sys.exit(main())
