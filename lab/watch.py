"""What happened during a memory scenario, as it happened: process deaths (pidfds), the cgroup
reaching its limit and the kernel's OOM kills (cgroup counters, cgroup v1 eventfds), and the
kernel log's OOM records. Used by lab.scenario and the benchmarks.
"""
from __future__ import annotations

import contextlib
import os
import re
import select
import threading
import time
from dataclasses import dataclass

from lab.cgroup import MemoryCgroup

MiB = 1024 * 1024


@dataclass
class Event:
    t: float                   # seconds since the hogs started (negative: before)
    what: str

    def __str__(self) -> str:
        return f"{self.t:+9.3f}s  {self.what}"


_KMSG_OOM_RE = re.compile(r"oom-kill:.*oom_memcg=([^,]+),.*task=([^,]+),pid=(\d+)")


def kmsg_oom_victims(lines: list[str], memcg: str) -> list[tuple[int, str]]:
    """(pid, comm) of kernel OOM kills in `memcg` (as /proc/PID/cgroup shows it) or below."""
    out = []
    for line in lines:
        m = _KMSG_OOM_RE.search(line)
        if m and (m.group(1) == memcg or m.group(1).startswith(memcg + "/")):
            out.append((int(m.group(3)), m.group(2)))
    return out


def cgroup_oom_victims(kmsg_lines: list[str], memcg: str, log_pids: list[int] = (),
                       log_label: str = "postgres, from the server log") -> list[str]:
    """"pid 123 (comm)" for each kernel OOM kill in the cgroup, plus processes that only the
    database's own log names as killed (`log_pids`)."""
    victims = [f"pid {pid} ({comm})" for pid, comm in kmsg_oom_victims(kmsg_lines, memcg)]
    for pid in log_pids:
        if not any(v.startswith(f"pid {pid} ") for v in victims):
            victims.append(f"pid {pid} ({log_label})")
    return victims


# --- kernel readers --------------------------------------------------------------------------

class Kmsg:
    """Kernel log records written after construction (empty when /dev/kmsg is unreadable)."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None

    def read(self) -> list[str]:
        lines: list[str] = []
        while self.fd is not None:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:      # records overwritten before we read them: skip ahead
                continue
            if not rec:
                break
            lines.append(rec.decode(errors="replace").split(";", 1)[-1].rstrip("\n"))
        return lines

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _limit_counters(cg: MemoryCgroup) -> tuple[int, int]:
    """(times the cgroup hit its limit, kernel OOM kills) from the cgroup's own counters."""
    return cg.limit_hits(), cg.oom_kills()


class Watcher(threading.Thread):
    """Timestamps the scenario's events as they happen, into `timeline`.

    Process deaths come from pidfds (exact); on cgroup v1 the limit and the OOM killer also
    notify through eventfds registered in cgroup.event_control (sub-millisecond). The
    failcnt / memory.events counters are polled every 2 ms as well, which covers cgroup v2.
    """

    POLL = 0.002

    def __init__(self, cg: MemoryCgroup, t0: float, kills_until: float, load: str = "pgbench"):
        super().__init__(name="scenario-watcher", daemon=True)
        # After `kills_until` (the end of the load, e.g. pgbench's -T) backends exit because their
        # client is done: deaths are still noted, but no longer count as kills.
        self.cg, self.t0, self.kills_until, self.load = cg, t0, kills_until, load
        self.timeline: list[Event] = []
        self.limit_reached: float | None = None
        self.first_kill: float | None = None
        self.deaths: dict[str, float] = {}     # label -> time
        self._lock = threading.Lock()
        self._stopfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._stopfd, select.EPOLLIN)
        self._fds: dict[int, tuple[str, str]] = {}   # fd -> (kind, label)
        self._files: list[int] = []
        self._base = _limit_counters(cg)
        self._oom_noted = False
        if cg.version == 1:
            self._v1_event("memory.usage_in_bytes", f" {cg.limit_bytes - 2 * MiB}", "limit")
            self._v1_event("memory.oom_control", "", "oom")

    def _v1_event(self, filename: str, arg: str, kind: str) -> None:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ffd = os.open(self.cg.path / filename, os.O_RDONLY | os.O_CLOEXEC)
        (self.cg.path / "cgroup.event_control").write_text(f"{efd} {ffd}{arg}")
        self._files += [efd, ffd]
        self._fds[efd] = (kind, filename)
        self._ep.register(efd, select.EPOLLIN)

    def watch_process(self, pid: int, label: str) -> None:
        try:
            pfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.note(f"{label} already gone")
            return
        with self._lock:
            self._fds[pfd] = ("death", label)
            self._files.append(pfd)
        self._ep.register(pfd, select.EPOLLIN)

    def note(self, what: str, at: float | None = None) -> float:
        t = (at if at is not None else time.monotonic()) - self.t0
        with self._lock:
            self.timeline.append(Event(t, what))
        return t

    def _limit(self, how: str) -> None:
        if self.limit_reached is None:
            self.limit_reached = self.note(f"cgroup reached its limit ({how})")

    def _kill(self, what: str) -> None:
        t = self.note(what)
        if self.first_kill is None:
            self.first_kill = t

    def run(self) -> None:
        oom_seen = self._base[1]
        while True:
            for fd, _ in self._ep.poll(self.POLL):
                if fd == self._stopfd:
                    return
                kind, label = self._fds[fd]
                if kind == "death":
                    self._ep.unregister(fd)
                    now = time.monotonic()
                    if now >= self.kills_until:
                        self.note(f"{label} exited after {self.load}'s run")
                        continue
                    with self._lock:
                        self.deaths[label] = now - self.t0
                    self._kill(f"{label} died")
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    if kind == "limit":
                        self._limit("usage threshold event")
                    elif not self._oom_noted:     # it fires on every OOM attempt: note the first
                        self._oom_noted = True
                        self.note("cgroup out of memory (memory.oom_control event)")
            try:
                hits, ooms = _limit_counters(self.cg)
            except OSError:
                continue
            if hits > self._base[0]:
                self._limit("failcnt" if self.cg.version == 1 else "memory.events max")
            if ooms > oom_seen:
                self._kill(f"kernel OOM kill #{ooms - self._base[1]} (counter)")
                oom_seen = ooms

    def stop(self) -> None:
        os.eventfd_write(self._stopfd, 1)
        if self.is_alive():
            self.join(5)
        for fd in self._files + [self._stopfd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ep.close()
        self.timeline.sort(key=lambda e: e.t)
