"""A memory hog: grows its anonymous memory in steps, touching every page, then holds it.

    python -m lab.hog --total 150M --step 5M --interval 0.05 --hold 120
    python -m lab.hog --gate --total unlimited --step 8M --interval 0      # until killed
    python -m lab.hog --total 48M --step 1M --read FILE --churn 1M --hold-stdin
    python -m lab.hog --total 96M --step 96M --shared --fork --hold-stdin

In order: --gate waits for a line on stdin; then it grows to --total (--shared: in MAP_SHARED
anonymous mappings; --fork then forks once, and the child maps the same pages); --read reads
a file through the page cache (--passes times, --drop-cache after each pass), so the hog's
cgroup holds that cache or reclaims for it; then it holds its memory for --hold seconds or
until stdin closes (--hold-stdin), meanwhile mapping, touching and unmapping --churn bytes
every --churn-interval seconds if asked (fresh pages each time: each one a charge).

Each step is written one byte per page: the kernel backs (and charges to the memory cgroup)
only pages that are written, so RSS really grows by `step` each time. Progress goes to
stdout, one line per step ("hog: 45 MiB"), then once "hog: holding 150 MiB for 120 s (pid N,
grown in 1.503 s)" from each process; flushed, so a parent reading a pipe or a file sees
them live. Exits 0 after holding; normally it is killed.
"""
from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import time
from typing import Callable, IO

from dbguard.errors import DbguardError
from dbguard.units import parse_size

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLIMITED = -1


def _touch(chunk) -> None:
    # bytearray(n) is calloc'd and a fresh mapping is unbacked: untouched pages stay free. One write per page.
    chunk[::PAGE] = b"\x01" * len(range(0, len(chunk), PAGE))


def grow(total: int, step: int, interval: float, out: IO[str] | None = None, *,
         shared: bool = False) -> list:
    """Allocate `total` bytes (UNLIMITED: until killed) in `step`-sized, page-touched chunks;
    returns them (keep them alive)."""
    chunks: list = []
    held = 0
    while total == UNLIMITED or held < total:
        n = step if total == UNLIMITED else min(step, total - held)
        chunk = mmap.mmap(-1, n, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS) if shared else bytearray(n)
        _touch(chunk)
        chunks.append(chunk)
        held += n
        if out is not None:
            out.write(f"hog: {held // MiB} MiB\n")
            out.flush()
        if interval and (total == UNLIMITED or held < total):
            time.sleep(interval)
    return chunks


def read_file(path: str, passes: int, drop_cache: bool) -> None:
    """Read `path` through the page cache `passes` times (0: forever), dropping its cached
    pages after each pass when asked (so the next pass reads from disk again)."""
    done = 0
    while passes == 0 or done < passes:
        with open(path, "rb", buffering=0) as f:
            while f.read(MiB):
                pass
            if drop_cache:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        done += 1


def churn(size: int, interval: float, until: Callable[[], bool]) -> None:
    """Map, touch and unmap `size` bytes every `interval` s until until() says stop: every
    round charges fresh pages (a freed malloc block could be reused without a new charge)."""
    while not until():
        m = mmap.mmap(-1, size)
        _touch(m)
        m.close()
        time.sleep(interval)


def spawn(total: int, step: int, interval: float, hold: float, *,
          preexec_fn: Callable[[], None] | None = None, stdout: IO | int | None = None,
          stdin: IO | int | None = subprocess.DEVNULL, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a hog process (e.g. inside a MemoryCgroup: preexec_fn=cgroup.preexec()); `options`
    are further command-line options (("--gate",), ("--read", path), ...)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen(
        [sys.executable, "-m", "lab.hog", "--total", "unlimited" if total == UNLIMITED else str(total),
         "--step", str(step), "--interval", str(interval), "--hold", str(hold), *options],
        preexec_fn=preexec_fn, stdout=stdout, stderr=subprocess.STDOUT, stdin=stdin,
        env=env, close_fds=True)


def wait_holding(p: subprocess.Popen, what: str = "hog") -> str:
    """Read a hog's progress (stdout=PIPE) up to its "holding" line, which it returns; an
    AssertionError names how it ended if it ended first (killed by the OOM killer?)."""
    for line in p.stdout:
        text = line.decode() if isinstance(line, bytes) else line
        if "holding" in text:
            return text.strip()
    raise AssertionError(f"{what} (pid {p.pid}) ended before holding its memory (exit {p.wait()}; "
                         "killed by the OOM killer?)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.hog", description=__doc__.splitlines()[0])
    ap.add_argument("--total", default="150M", help="memory to allocate in all, or 'unlimited' (default 150M)")
    ap.add_argument("--step", default="5M", help="memory per step (default 5M)")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between steps (default 0.05)")
    ap.add_argument("--hold", type=float, default=600.0, help="seconds to hold the memory, then exit (default 600)")
    ap.add_argument("--hold-stdin", action="store_true", help="hold until stdin closes instead of --hold seconds")
    ap.add_argument("--gate", action="store_true", help="wait for a line on stdin before allocating")
    ap.add_argument("--shared", action="store_true", help="allocate MAP_SHARED anonymous mappings")
    ap.add_argument("--fork", action="store_true", help="after growing, fork once; the child maps the same "
                    "pages (with --shared: the pages are then shared, PSS halves)")
    ap.add_argument("--read", metavar="FILE", help="after growing, read FILE through the page cache")
    ap.add_argument("--passes", type=int, default=1, help="times to read FILE, 0 for ever (default 1)")
    ap.add_argument("--drop-cache", action="store_true", help="drop FILE's cached pages after each pass")
    ap.add_argument("--churn", default="0", help="while holding, map+touch+unmap this much every "
                    "--churn-interval s (default 0: none)")
    ap.add_argument("--churn-interval", type=float, default=0.05, help="seconds between churns (default 0.05)")
    args = ap.parse_args(argv)
    try:
        total = UNLIMITED if args.total == "unlimited" else parse_size(args.total, "--total")
        step, churn_size = parse_size(args.step, "--step"), parse_size(args.churn, "--churn")
    except DbguardError as e:
        ap.error(str(e))
    if step <= 0:
        ap.error("--step: must be positive")
    if args.passes < 0:
        ap.error("--passes: must be 0 (for ever) or more")
    if args.gate:
        sys.stdin.readline()
    t0 = time.monotonic()
    chunks = grow(total, step, args.interval, sys.stdout, shared=args.shared)
    grown = time.monotonic() - t0
    if args.fork and os.fork() == 0:
        # A shared mapping's page tables are not copied at fork: the child maps the pages on access.
        for c in chunks:
            sum(c[::PAGE])
    if args.read:
        read_file(args.read, args.passes, args.drop_cache)
    how = "until stdin closes" if args.hold_stdin else f"for {args.hold:g} s"
    # One write per line: a forked parent and child do not interleave.
    os.write(1, f"hog: holding {total // MiB} MiB {how} (pid {os.getpid()}, grown in {grown:.3f} s)\n".encode())
    if args.hold_stdin:
        if churn_size:
            import threading
            closed = threading.Event()
            threading.Thread(target=lambda: (sys.stdin.read(), closed.set()), daemon=True).start()
            churn(churn_size, args.churn_interval, closed.is_set)
        else:
            sys.stdin.read()
    elif churn_size:
        end = time.monotonic() + args.hold
        churn(churn_size, args.churn_interval, lambda: time.monotonic() >= end)
    else:
        time.sleep(args.hold)
    del chunks
    return 0


if __name__ == "__main__":
    sys.exit(main())
