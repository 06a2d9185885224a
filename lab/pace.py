"""How much slower this machine runs than the one the lab's waits were written for.

The lab bounds its waits (dbguard's start, a hog's growth, a buffer pool growing back) in
seconds that are ample on the development hosts. The cgroup v2 test VM emulates its CPUs
(TCG), so there everything takes several times longer, by a factor that depends on what else
the host runs. lab/vm.py measures the same fixed piece of work on the host just before boot
and the guest measures it again at the job's start; the ratio is DBGUARD_LAB_SLOWDOWN in the
guest's environment, and `bound()` stretches a wait by it. Bounds only: no test asserts a time.

    python -m lab.pace                  # seconds this machine takes for the work
    python -m lab.pace --against 0.21   # this machine's slowdown against one that took 0.21 s
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ENV = "DBGUARD_LAB_SLOWDOWN"
# Pure Python measured 26.6 times slower in the VM (TCG, 2026-12-01): a wait that fails must
# still end well within the VM job's hour (tests/vm/test_vm.py SUITE_TIMEOUT), so no more than this.
MAX_STRETCH = 10.0


def work_seconds(rounds: int = 3) -> float:
    """The fastest of `rounds` runs of a fixed CPU-bound piece of Python (the fastest: the
    least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        sum(i * i for i in range(1_000_000))
        best = min(best, time.perf_counter() - t0)
    return best


def slowdown() -> float:
    """This machine's measured slowdown (DBGUARD_LAB_SLOWDOWN, set in the test VM), never below 1."""
    try:
        return max(1.0, float(os.environ.get(ENV, "1")))
    except ValueError:
        return 1.0


def bound(seconds: float) -> float:
    """A wait's bound, stretched by this machine's slowdown (at most MAX_STRETCH times)."""
    return seconds * min(slowdown(), MAX_STRETCH)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.pace", description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=float, metavar="SECONDS",
                    help="print the slowdown against a machine that took SECONDS for the same work")
    args = ap.parse_args(argv)
    took = work_seconds()
    print(f"{took / args.against:.2f}" if args.against else f"{took:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
