"""`make demo`: the issue's scenario without and then with dbguard, side by side.

PostgreSQL 15 (shared_buffers=500MB, pgbench scale 30, `pgbench -S -c 8`) and six 150 MB
hogs in one 1000 MB memory cgroup. Takes a minute or two; needs root and a memory cgroup.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from dbguard.errors import DbguardError
from lab.scenario import ScenarioResult, require_lab, run_pg_scenario


def _yes(b: bool) -> str:
    return "yes" if b else "NO"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def table(results: list[ScenarioResult]) -> str:
    """A plain-text table, one column per run."""
    rows = [
        ("", [f"guard: {r.guard}" for r in results]),
        ("database survived", [_yes(r.database_survived) for r in results]),
        ("crash recoveries", [str(r.crash_recoveries) for r in results]),
        ("sessions lost", [str(r.sessions_lost) for r in results]),
        ("failed transactions", [str(r.transactions_failed) for r in results]),
        ("transactions ok", [str(r.transactions_ok) for r in results]),
        ("tps under pressure", ["-" if r.tps_under_pressure is None else f"{r.tps_under_pressure:.0f}"
                                for r in results]),
        ("hogs killed", [f"{len(r.hogs_killed)} of {r.hogs}" for r in results]),
        ("kernel OOM kills", [str(r.oom_kills) for r in results]),
        ("time to first kill", [_secs(r.time_to_first_kill) for r in results]),
    ]
    w0 = max(len(name) for name, _ in rows)
    widths = [max(len(vals[i]) for _, vals in rows) for i in range(len(results))]
    lines = []
    for name, vals in rows:
        lines.append("  ".join([name.ljust(w0)] + [v.rjust(w) for v, w in zip(vals, widths)]))
        if not name:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0],
                                 epilog="Run as root. Ctrl-C stops it and cleans up.")
    ap.add_argument("--duration", type=int, default=45, help="pgbench run length in seconds (default 45)")
    ap.add_argument("--only", choices=("none", "dbguard"), help="run just one of the two cases")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each run's timeline and server log")
    args = ap.parse_args(argv)

    start = time.monotonic()
    # `kill` / a CI timeout: clean up as for Ctrl-C (the scenario's finally blocks do the work)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - start:5.1f}s] {msg}", flush=True)

    results: list[ScenarioResult] = []
    failed = ""
    try:
        require_lab()
        for guard in [args.only] if args.only else ["none", "dbguard"]:
            say(f"--- scenario with guard: {guard}")
            results.append(run_pg_scenario(guard, duration=args.duration, log=say))
            if args.verbose:
                print(results[-1].summary(), flush=True)
    except DbguardError as e:
        failed = str(e)
        if not results:
            print(f"demo: {failed}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything it started has been stopped and removed", file=sys.stderr)
        return 130
    print()
    print(table(results))
    print("\n(time to first kill: from the cgroup first hitting its 1000 MB limit after the hogs start)")
    if failed:       # the control ran, the guarded run could not: show what we have, then why
        print(f"demo: the run with dbguard did not complete: {failed}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
