"""Memory pressure of the watched cgroup (v1 or v2) or of the host, and a way to wait for it.

read() takes one MemoryReading: usage, limit, reclaimable page cache, PSI avg10.
wait() (sense/wakeups.py) blocks until the kernel says something happened or the timeout
passes, so the loop reacts at once without polling fast.
"""
from __future__ import annotations

import os

from ..errors import DbguardError
from ..model import MemoryReading
from .memtext import (MEMINFO, PROC_PSI_IO, PROC_PSI_MEMORY, UNPRIVILEGED_WINDOW_US, parse_flat_keyed,  # noqa: F401
                      parse_limit, parse_meminfo, psi_avg10, psi_some_total, reclaimable_from_stat,
                      trigger_is_genuine, trigger_line, unprivileged_window)
from .wakeups import Wakeups

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


class PressureMonitor(Wakeups):
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
        # A cgroup on v1 has no PSI of its own: the host's stalls are everyone's. With one
        # scope they are its own (as ever); one of several scopes must not take a stall in
        # another for its own pressure, so the sensor turns this off: usage marks judge it.
        self.own_psi = self.version == 0 or self.psi_path != PROC_PSI_MEMORY
        self.count_host_psi = True
        self._init_wakeups(trigger_stall_us)
        self.read()                     # fail now, with one line, if the files cannot be read
        self._open_trigger(trigger_stall_us, trigger_window_us)
        self._open_limit_events()

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
        counted = self.own_psi or self.count_host_psi
        some, full = self._psi() if counted else (0.0, 0.0)
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
                             reclaimable_bytes=reclaimable, io_some_avg10=self._io_some() if counted else 0.0)

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

    def close(self) -> None:
        self.close_wakeups()

    def __enter__(self) -> "PressureMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
