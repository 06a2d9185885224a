"""A memory hog: grows its anonymous memory in steps, touching every page, then holds it.

    python -m lab.hog --total 150M --step 5M --interval 0.05 --hold 120

Each step is a bytearray with one byte written per page: the kernel backs (and charges to
the memory cgroup) only pages that are written, so RSS really grows by `step` each time.
Progress goes to stdout, one line per step ("hog: 45 MiB"), flushed so a parent that
redirects it to a file sees it live. Exits 0 after `hold` seconds; normally it is killed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Callable, IO

from dbguard.units import parse_size
from dbguard.errors import DbguardError

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


def grow(total: int, step: int, interval: float, out: IO[str] | None = None) -> list[bytearray]:
    """Allocate `total` bytes in `step`-sized, page-touched chunks; returns them (keep them alive)."""
    chunks: list[bytearray] = []
    held = 0
    while held < total:
        n = min(step, total - held)
        chunk = bytearray(n)
        # bytearray(n) is calloc'd: untouched pages would stay unbacked. One write per page.
        chunk[::PAGE] = b"\x01" * len(range(0, n, PAGE))
        chunks.append(chunk)
        held += n
        if out is not None:
            out.write(f"hog: {held // MiB} MiB\n")
            out.flush()
        if interval and held < total:
            time.sleep(interval)
    return chunks


def spawn(total: int, step: int, interval: float, hold: float, *,
          preexec_fn: Callable[[], None] | None = None, stdout: IO | int | None = None) -> subprocess.Popen:
    """Start a hog process (e.g. inside a MemoryCgroup: preexec_fn=cgroup.preexec())."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, "-m", "lab.hog", "--total", str(total), "--step", str(step),
         "--interval", str(interval), "--hold", str(hold)],
        preexec_fn=preexec_fn, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, close_fds=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.hog", description=__doc__.splitlines()[0])
    ap.add_argument("--total", default="150M", help="memory to allocate in all (default 150M)")
    ap.add_argument("--step", default="5M", help="memory per step (default 5M)")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between steps (default 0.05)")
    ap.add_argument("--hold", type=float, default=600.0, help="seconds to hold the memory, then exit (default 600)")
    args = ap.parse_args(argv)
    try:
        total, step = parse_size(args.total, "--total"), parse_size(args.step, "--step")
    except DbguardError as e:
        ap.error(str(e))
    if step <= 0:
        ap.error("--step: must be positive")
    chunks = grow(total, step, args.interval, sys.stdout)
    print(f"hog: holding {total // MiB} MiB for {args.hold:g} s", flush=True)
    time.sleep(args.hold)
    del chunks
    return 0


if __name__ == "__main__":
    sys.exit(main())
