"""Memory pressure of the watched cgroup (v1 or v2) or of the host, and a way to wait for it.

read() takes one MemoryReading: usage, limit, reclaimable page cache, PSI avg10.
wait() blocks until the kernel says something happened (a PSI trigger, or for cgroup v1
a usage threshold crossed) or the timeout passes, so the loop reacts at once without
polling fast. Where triggers cannot be had, wait() sleeps and `trigger_error` says why.
"""
from __future__ import annotations

import errno
import os
import select
import time

from ..errors import DbguardError
from ..model import MemoryReading
from .memtext import (MEMINFO, PROC_PSI_IO, PROC_PSI_MEMORY, UNPRIVILEGED_WINDOW_US, parse_flat_keyed, parse_limit,
                      parse_meminfo, psi_avg10, psi_some_total, reclaimable_from_stat, trigger_is_genuine,
                      trigger_line, unprivileged_window)

# --- I/O ----------------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _missing(cgroup_dir: str) -> DbguardError:
    return DbguardError(f"pressure.cgroup: {cgroup_dir} does not exist; "
                        "set it to the database's memory cgroup directory")


def cgroup_version(cgroup_dir: str) -> int:
    """1 or 2 for a memory cgroup directory, 0 for the host ("")."""
    if not cgroup_dir:
        return 0
    if not os.path.isdir(cgroup_dir):
        raise _missing(cgroup_dir)
    if os.path.exists(os.path.join(cgroup_dir, "memory.usage_in_bytes")):
        return 1
    if os.path.exists(os.path.join(cgroup_dir, "cgroup.controllers")):
        if os.path.exists(os.path.join(cgroup_dir, "memory.stat")):
            return 2
        raise DbguardError(f"pressure.cgroup: {cgroup_dir} is a cgroup v2 directory without the memory "
                           "controller; enable it in the parent's cgroup.subtree_control or give the "
                           "v1 directory under /sys/fs/cgroup/memory")
    raise DbguardError(f"pressure.cgroup: {cgroup_dir} is not a memory cgroup directory; "
                       "set it to a directory under /sys/fs/cgroup/memory (v1) or /sys/fs/cgroup (v2)")


class PressureMonitor:
    """Reads and waits on one memory cgroup (cgroup_dir) or on the host (None or "")."""

    def __init__(self, cgroup_dir: str | None, *, trigger_stall_us: int, trigger_window_us: int):
        self.cgroup_dir = (cgroup_dir or "").rstrip("/")
        self.version = cgroup_version(self.cgroup_dir)
        # The v2 root has no memory.current: it is the host. Decided once, here: a child that
        # is removed later loses its memory.current too, and must read as missing, not as the host.
        self._v2_root = self.version == 2 and not os.path.exists(os.path.join(self.cgroup_dir, "memory.current"))
        self._mem_total = parse_meminfo(_read_text(MEMINFO))["MemTotal"]
        v2_psi = os.path.join(self.cgroup_dir, "memory.pressure")
        self.psi_path = v2_psi if self.version == 2 and os.path.exists(v2_psi) else PROC_PSI_MEMORY
        v2_io = os.path.join(self.cgroup_dir, "io.pressure")
        self.io_psi_path = v2_io if self.version == 2 and os.path.exists(v2_io) else PROC_PSI_IO
        self.trigger_active = False
        self.trigger_error = ""
        self.trigger_note = ""          # e.g. the window was rounded up for an unprivileged trigger
        self.trigger_spec = ""          # what the kernel accepted: "some <stall_us> <window_us>"
        self.usage_threshold: int | None = None
        self.spurious_triggers = 0      # trigger events without the stall behind them (see trigger_is_genuine)
        self._stall_us = trigger_stall_us
        self._horizon = 0.0
        self._samples: list[tuple[float, int]] = []
        self._poll = select.poll()
        self._psi_fd: int | None = None
        self._event_fd: int | None = None
        self._usage_fd: int | None = None
        self._wake_fd: int | None = None
        self.read()                     # fail now, with one line, if the files cannot be read
        self._open_trigger(trigger_stall_us, trigger_window_us)

    # --- reading -------------------------------------------------------------------------------
    def _cg(self, name: str) -> str:
        path = os.path.join(self.cgroup_dir, name)
        try:
            return _read_text(path)
        except FileNotFoundError:
            if not os.path.isdir(self.cgroup_dir):
                raise _missing(self.cgroup_dir) from None
            raise DbguardError(f"pressure.cgroup: {path} is missing; "
                               "is this a memory cgroup directory?") from None
        except PermissionError:
            raise DbguardError(f"pressure.cgroup: cannot read {path}: permission denied; "
                               "run dbguard as root") from None

    def _psi(self) -> tuple[float, float]:
        try:
            return psi_avg10(_read_text(self.psi_path))
        except OSError:
            # No PSI (kernel without CONFIG_PSI, or booted psi=0): usage marks still work.
            return 0.0, 0.0

    def _io_some(self) -> float:
        try:
            return psi_avg10(_read_text(self.io_psi_path))[0]
        except OSError:
            return 0.0

    def read(self) -> MemoryReading:
        some, full = self._psi()
        if self.version == 0:
            usage, limit, reclaimable = self._host_usage()
        elif self.version == 1:
            usage = int(self._cg("memory.usage_in_bytes"))
            stat = parse_flat_keyed(self._cg("memory.stat"))
            # The limit that binds may be an ancestor's: v1 sums it up as hierarchical_memory_limit.
            raw = stat.get("hierarchical_memory_limit")
            limit = parse_limit(str(raw) if raw is not None else self._cg("memory.limit_in_bytes"),
                                self._mem_total)
            reclaimable = reclaimable_from_stat(stat, 1)
        else:
            if self._v2_root:
                usage, limit, reclaimable = self._host_usage()
            else:
                usage = int(self._cg("memory.current"))
                limit = self._v2_limit()
                reclaimable = reclaimable_from_stat(parse_flat_keyed(self._cg("memory.stat")), 2)
        return MemoryReading(cgroup=self.cgroup_dir, cgroup_version=self.version, usage_bytes=usage,
                             limit_bytes=limit, psi_some_avg10=some, psi_full_avg10=full,
                             reclaimable_bytes=reclaimable, io_some_avg10=self._io_some())

    def _host_usage(self) -> tuple[int, int, int]:
        info = parse_meminfo(_read_text(MEMINFO))
        # MemAvailable already leaves out what reclaim can give back, so nothing more is
        # reclaimable on top of this usage (counting it twice would hide real pressure).
        return info["MemTotal"] - info["MemAvailable"], info["MemTotal"], 0

    def _v2_limit(self) -> int | None:
        """The tightest memory.max of the cgroup and its ancestors: v2 has no hierarchical sum."""
        limits = []
        d = self.cgroup_dir
        while os.path.exists(os.path.join(d, "memory.max")):
            limit = parse_limit(_read_text(os.path.join(d, "memory.max")), self._mem_total)
            if limit is not None:
                limits.append(limit)
            d = os.path.dirname(d)
        return min(limits) if limits else None

    # --- waking up -----------------------------------------------------------------------------
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
        self._poll.register(fd, select.POLLPRI)
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
        self._poll.register(efd, select.POLLIN)
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
            self._poll.unregister(self._event_fd)
            os.close(self._event_fd)   # closing the eventfd is what unregisters it in the kernel
            self._event_fd = None
        self.usage_threshold = None

    def add_wake_fd(self, fd: int) -> None:
        """Also wake wait() when `fd` becomes readable (the daemon's signal pipe); the owner drains it."""
        self._wake_fd = fd
        self._poll.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Block until a PSI trigger fires, usage crosses the threshold or the wake fd is
        readable (True), or `timeout` s pass."""
        deadline = time.monotonic() + timeout
        if self._psi_fd is not None:
            self._sample(time.monotonic())
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._psi_fd is None and self._event_fd is None and self._wake_fd is None:
                time.sleep(remaining)
                return False
            fired = False
            for fd, events in self._poll.poll(max(1, int(remaining * 1000))):
                if fd == self._wake_fd:
                    fired = True
                elif fd == self._event_fd:
                    try:
                        os.eventfd_read(fd)   # reset the counter, or poll() stays readable
                    except BlockingIOError:
                        pass
                    fired = True
                elif fd == self._psi_fd:
                    if events & (select.POLLERR | select.POLLNVAL):
                        # The watched cgroup went away under the trigger.
                        self._close_trigger(f"PSI trigger on {self.psi_path} broke (cgroup removed?)")
                    elif events & select.POLLPRI:
                        fired |= self._genuine(time.monotonic())
            if fired:
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
            self._poll.unregister(self._psi_fd)
            os.close(self._psi_fd)
            self._psi_fd = None
        self.trigger_active = False
        if why:
            self.trigger_error = why

    def close(self) -> None:
        self._close_trigger("")
        self._drop_threshold()
        if self._usage_fd is not None:
            os.close(self._usage_fd)
            self._usage_fd = None

    def __enter__(self) -> "PressureMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
