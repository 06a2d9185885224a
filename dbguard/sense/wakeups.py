"""Waking the loop the moment the kernel says memory is running out, not at the next poll.

Every source is a descriptor in one poll set: the PSI trigger (the cgroup's own
memory.pressure on v2, /proc/pressure/memory otherwise), on cgroup v1 the usage threshold
at the next mark and the cgroup's OOM notifier (memory.oom_control through
cgroup.event_control), on cgroup v2 memory.events (the kernel notifies it on every `high`,
`max` and `oom` event), and descriptors the daemon adds (its signal pipe, the BPF ring
buffer). wait() returns as soon as one fires and says which in `fired`. Where a source
cannot be had, `trigger_error` says why and the others still work; with none, wait()
sleeps. `wait_any` waits on several monitors at once (one per watched scope).
"""
from __future__ import annotations

import errno
import os
import select
import time

from .memtext import (UNPRIVILEGED_WINDOW_US, limit_event_kind, parse_flat_keyed, psi_some_total, trigger_is_genuine,
                      trigger_line, unprivileged_window)


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


class Wakeups:
    """The wake-up half of PressureMonitor (which sets cgroup_dir, version and psi_path)."""

    cgroup_dir: str
    version: int
    psi_path: str

    def _init_wakeups(self, trigger_stall_us: int) -> None:
        self.trigger_active = False
        self.trigger_error = ""
        self.trigger_note = ""          # e.g. the window was rounded up for an unprivileged trigger
        self.trigger_spec = ""          # what the kernel accepted: "some <stall_us> <window_us>"
        self.usage_threshold: int | None = None
        self.spurious_triggers = 0      # trigger events without the stall behind them (see trigger_is_genuine)
        self.limit_events = ""          # the kernel's limit notifier in use ("memory.events", "memory.oom_control")
        self.fired: set[str] = set()    # what woke the last wait(): "psi", "usage", "limit", "high", "fd"
        self._events: dict[str, int] = {}       # v2: memory.events as last read (what a change is measured against)
        self._stall_us = trigger_stall_us
        self._horizon = 0.0
        self._samples: list[tuple[float, int]] = []
        self._watching: dict[int, int] = {}     # fd -> poll events: what wait_any polls for
        self._psi_fd: int | None = None
        self._event_fd: int | None = None
        self._usage_fd: int | None = None
        self._limit_fd: int | None = None       # v1: eventfd of memory.oom_control; v2: memory.events
        self._limit_src: int | None = None      # v1: the open memory.oom_control
        self._wake_fds: set[int] = set()

    def _open_limit_events(self) -> None:
        """The kernel's own word that the cgroup hit its limit: v2 memory.events changes on
        every high, max and oom event; v1 signals an OOM through memory.oom_control."""
        try:
            if self.version == 2 and os.path.exists(os.path.join(self.cgroup_dir, "memory.events")):
                fd = os.open(os.path.join(self.cgroup_dir, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)
                self._events = parse_flat_keyed(os.read(fd, 4096).decode())    # armed: the next change is an event
                self._limit_fd, self.limit_events = fd, "memory.events"
                self._watching[fd] = select.POLLPRI
            elif self.version == 1:
                src = os.open(os.path.join(self.cgroup_dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                try:
                    with open(os.path.join(self.cgroup_dir, "cgroup.event_control"), "w") as f:
                        f.write(f"{efd} {src}")
                except OSError:
                    os.close(efd)
                    os.close(src)
                    raise
                self._limit_fd, self._limit_src, self.limit_events = efd, src, "memory.oom_control"
                self._watching[efd] = select.POLLIN
        except OSError as e:
            self.trigger_error = self.trigger_error or f"limit events on {self.cgroup_dir}: {e.strerror}"

    def _open_trigger(self, stall_us: int, window_us: int) -> None:
        try:
            fd = os.open(self.psi_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            self.trigger_error = (f"cannot open {self.psi_path}: {e.strerror}; "
                                  "PSI needs CONFIG_PSI and the psi=1 boot option")
            return
        if stall_us > window_us:
            os.close(fd)
            self.trigger_error = (f"PSI trigger stall {stall_us} us exceeds its window {window_us} us; "
                                  "lower pressure.psi_trigger_stall_us")
            return
        windows = [window_us]
        if window_us % UNPRIVILEGED_WINDOW_US:
            windows.append(unprivileged_window(window_us))
        for window in windows:
            try:
                os.write(fd, trigger_line(stall_us, window))
            except OSError as e:
                if e.errno == errno.EINVAL and window != windows[-1]:
                    continue
                os.close(fd)
                self.trigger_error = (f"kernel refused PSI trigger 'some {stall_us} {window}' on "
                                      f"{self.psi_path}: {e.strerror}")
                if e.errno == errno.EINVAL:
                    self.trigger_error += "; without CAP_SYS_RESOURCE the window must be a multiple of 2 s"
                return
            if window != window_us:
                self.trigger_note = (f"PSI trigger window raised from {window_us} to {window} us: "
                                     "without CAP_SYS_RESOURCE the kernel takes only multiples of 2 s")
            self.trigger_spec = f"some {stall_us} {window}"
            # Two windows (the kernel carries part of the last one over) plus its 2 s averaging tick.
            self._horizon = 2 * window / 1e6 + 2.0
            break
        self._psi_fd = fd
        self._watching[fd] = select.POLLPRI
        self.trigger_active = True
        self._sample(time.monotonic())

    def _sample(self, now: float) -> int | None:
        """Record the PSI some total; keep what trigger_is_genuine may need and no more."""
        try:
            total = psi_some_total(_read_text(self.psi_path))
        except OSError:
            return None
        if total is None:
            return None
        self._samples.append((now, total))
        old = [i for i, (t, _) in enumerate(self._samples) if t <= now - self._horizon]
        if len(old) > 1:
            del self._samples[:old[-1]]
        return total

    def set_usage_threshold(self, threshold_bytes: int | None) -> bool:
        """Wake wait() when usage crosses `threshold_bytes` (either way). cgroup v1 only.

        Returns whether the kernel watches it; None or 0 removes the threshold.
        """
        self._drop_threshold()
        if not threshold_bytes:
            return False
        if self.version != 1:
            return False   # v2 has no usage thresholds; its PSI trigger is per cgroup instead
        try:
            if self._usage_fd is None:
                self._usage_fd = os.open(os.path.join(self.cgroup_dir, "memory.usage_in_bytes"),
                                         os.O_RDONLY | os.O_CLOEXEC)
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as e:
            self.trigger_error = f"usage threshold on {self.cgroup_dir}: {e.strerror}"
            return False
        try:
            with open(os.path.join(self.cgroup_dir, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {self._usage_fd} {int(threshold_bytes)}")
        except OSError as e:
            os.close(efd)
            self.trigger_error = (f"usage threshold on {self.cgroup_dir}: cgroup.event_control refused: "
                                  f"{e.strerror}")
            return False
        self._event_fd = efd
        self._watching[efd] = select.POLLIN
        self.usage_threshold = int(threshold_bytes)
        try:
            if int(os.pread(self._usage_fd, 32, 0)) >= self.usage_threshold:
                # Crossed between the reading and now: the kernel signals crossings only, so
                # none would come, and the loop would sleep out its interval above the mark.
                os.eventfd_write(efd, 1)
        except (OSError, ValueError):
            pass
        return True

    def _drop_threshold(self) -> None:
        if self._event_fd is not None:
            self._watching.pop(self._event_fd, None)
            os.close(self._event_fd)   # closing the eventfd is what unregisters it in the kernel
            self._event_fd = None
        self.usage_threshold = None

    def add_wake_fd(self, fd: int) -> None:
        """Also wake wait() when `fd` becomes readable (the daemon's signal pipe, the BPF ring
        buffer); the owner drains it."""
        self._wake_fds.add(fd)
        self._watching[fd] = select.POLLIN

    def wait(self, timeout: float) -> bool:
        """Block until a PSI trigger fires, usage crosses the threshold, the cgroup hits its
        limit or a wake fd is readable (True; `fired` says which), or `timeout` s pass."""
        return bool(wait_any([self], timeout))

    def _handle(self, fd: int, events: int) -> bool:
        """Take one poll result if `fd` is this monitor's (noting what fired); whether it was."""
        if fd not in self._watching:
            return False
        if fd in self._wake_fds:
            self.fired.add("fd")
        elif fd == self._event_fd or (fd == self._limit_fd and self._limit_src is not None):
            try:
                os.eventfd_read(fd)   # reset the counter, or poll() stays readable
            except BlockingIOError:
                pass
            self.fired.add("usage" if fd == self._event_fd else "limit")
        elif fd == self._limit_fd:
            os.lseek(fd, 0, os.SEEK_SET)
            events_now = parse_flat_keyed(os.read(fd, 4096).decode())     # re-armed for the next change
            kind = limit_event_kind(self._events, events_now)
            if kind:
                self.fired.add(kind)
            self._events = events_now
        elif fd == self._psi_fd:
            if events & (select.POLLERR | select.POLLNVAL):
                # The watched cgroup went away under the trigger.
                self._close_trigger(f"PSI trigger on {self.psi_path} broke (cgroup removed?)")
            elif events & select.POLLPRI and self._genuine(time.monotonic()):
                self.fired.add("psi")
        return True

    def _genuine(self, now: float) -> bool:
        samples = list(self._samples)
        total = self._sample(now)
        if total is None or trigger_is_genuine(samples, now, total, self._stall_us, self._horizon):
            return True
        self.spurious_triggers += 1
        return False

    def _close_trigger(self, why: str) -> None:
        if self._psi_fd is not None:
            self._watching.pop(self._psi_fd, None)
            os.close(self._psi_fd)
            self._psi_fd = None
        self.trigger_active = False
        if why:
            self.trigger_error = why

    def close_wakeups(self) -> None:
        self._close_trigger("")
        self._drop_threshold()
        for fd in (self._usage_fd, self._limit_fd, self._limit_src):
            if fd is not None:
                os.close(fd)
        self._usage_fd = self._limit_fd = self._limit_src = None


def wait_any(sources: list[Wakeups], timeout: float, wake_fds: frozenset[int] | set[int] = frozenset(),
             high_not_before: float = 0.0) -> set[str]:
    """Wait on every source's descriptors (one per watched scope) and on `wake_fds` (the
    daemon's signal pipe, the BPF ring buffer; the owner drains them) at once. What fired,
    across them all ("fd" for a wake fd; each source's `fired` says what fired there), as soon
    as anything did; empty when `timeout` s pass. Throttling news alone ("high") ends the wait
    no earlier than `high_not_before` (time.monotonic()): a cgroup held at its memory.high
    fires up to 50 times a second, and a cycle more often than the pressed pace learns nothing."""
    deadline = time.monotonic() + timeout
    held: set[str] = set()      # "high" seen before high_not_before
    for src in sources:
        src.fired = set()
        if src._psi_fd is not None:
            src._sample(time.monotonic())
    while True:
        now = time.monotonic()
        if held and now >= high_not_before:
            return held
        remaining = (min(deadline, high_not_before) if held else deadline) - now
        if remaining <= 0:
            return held
        poll = select.poll()      # built afresh: a source drops a broken trigger while waiting
        for fd in wake_fds:
            poll.register(fd, select.POLLIN)
        for src in sources:
            for fd, events in src._watching.items():
                poll.register(fd, events)
        if not wake_fds and not any(src._watching for src in sources):
            time.sleep(remaining)
            return held
        woken = set()
        for fd, events in poll.poll(max(1, int(remaining * 1000))):
            if fd in wake_fds:
                woken.add("fd")
            else:
                any(src._handle(fd, events) for src in sources)
        fired = woken.union(*(src.fired for src in sources))
        if fired - {"high"} or (fired and time.monotonic() >= high_not_before):
            return fired
        held |= fired
