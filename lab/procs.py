"""Process helpers for tests, the demo and benchmarks: start children and always reap them,
read a process's memory, CPU, parent and score from /proc, and wait for a condition.

Every reader returns None (or False) for a process that is gone, never raises: the lab
watches processes that the kernel, dbguard or the test itself may kill at any moment.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Processes:
    """Child processes that are all killed and reaped at the end, whatever happens.

        with Processes() as procs:
            p = procs.start([...], stdin=subprocess.PIPE)
            procs.add(hog.spawn(...))
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **popen) -> subprocess.Popen:
        return self.add(subprocess.Popen(argv, **popen))

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def append(self, p: subprocess.Popen) -> None:      # list-like, for code that keeps a list
        self.add(p)

    def __iter__(self):
        return iter(self.procs)

    def __len__(self) -> int:
        return len(self.procs)

    def exit_codes(self) -> list[int | None]:
        """Each one's exit code now (None: still running), in start order."""
        return [p.poll() for p in self.procs]

    def close(self, timeout: float = 10.0) -> None:
        stop_all(self.procs, timeout)
        for p in self.procs:
            for f in (p.stdin, p.stdout, p.stderr):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stop_all(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGKILL those still running (our own children only), then reap every one."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout)


def wait_until(cond: Callable[[], object], timeout: float, poll: float = 0.1) -> bool:
    """True as soon as cond() is true, False once `timeout` seconds passed (a bound on
    waiting for the kernel or a server, never an assertion about speed)."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


# --- /proc readers -----------------------------------------------------------------------------

def find_by_cmdline(marker: str) -> int | None:
    """A process (not this one) whose command line contains `marker`, e.g. a config path."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace"):
                return int(name)
    return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the comm field (which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    if not pid:
        return False
    f = _stat_fields(pid)
    return f is not None and f[0] != "Z"


def ppid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f else None


def start_time(pid: int) -> int | None:
    """Clock ticks after boot at which the process started: with the pid, its identity."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def cpu_ticks(pid: int) -> int | None:
    """utime + stime in clock ticks (CLK_TCK per second)."""
    f = _stat_fields(pid)
    return int(f[11]) + int(f[12]) if f else None


def rss(pid: int) -> int:
    """Resident bytes (0 when gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def status_kib(pid: int, key: str) -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def effective_capabilities(pid: int | str = "self") -> int | None:
    """The CapEff mask of a process (bit n: capability n, linux/capability.h); None if unreadable.
    Read here on its own, not through dbguard: the lab checks dbguard, it does not share its code."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def oom_score_adj(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return None


def set_oom_score_adj(pid: int, value: int) -> str | None:
    """Write a score as a test or a contender would; None when written, else the errno's name
    and text ("EACCES: Permission denied": lowering below the process's floor needs
    CAP_SYS_RESOURCE)."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(value))
        return None
    except OSError as e:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
