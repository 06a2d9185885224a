"""systemd units as a scenario's memory cgroups, on a systemd host with cgroup v2 (the test VM).

    with Slice("dbglab.slice", limit) as sl, Service("dbglab-pg.service", sl) as pg:
        PgCluster(cgroup=pg)                 # the server's processes join the unit's cgroup

A Slice is written to /run/systemd/system (a runtime unit, gone at reboot) with MemoryMax= and
any other [Slice] settings; a Service is a transient `systemd-run` unit holding one `sleep`
that keeps its cgroup alive, so other processes can join it. The limits are the ones systemd
writes, as on a host a DBA configured. Both behave as lab.cgroup.MemoryCgroup (path, pids,
usage, oom_kills, preexec) so lab.scenario can run in them; remove() stops the unit, which
kills what is left in it.
"""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from lab.cgroup import CGROUP_ROOT, MemoryCgroup

if TYPE_CHECKING:
    from lab.scenario import Placement

RUNTIME_UNITS = Path("/run/systemd/system")


def systemctl(*args: str) -> str:
    p = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"systemctl {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def control_group(unit: str) -> Path:
    """The unit's cgroup directory, as systemd placed it."""
    rel = systemctl("show", "-P", "ControlGroup", unit)
    if not rel:
        raise RuntimeError(f"{unit} has no cgroup (not running?)")
    return CGROUP_ROOT / rel.lstrip("/")


def _size(limit_bytes: int | None) -> str:
    return "infinity" if limit_bytes is None else str(limit_bytes)


class _Unit(MemoryCgroup):
    version = 2

    def __init__(self, unit: str, limit_bytes: int | None, settings: dict[str, str] | None = None):
        self.unit = unit
        self.limit_bytes = limit_bytes            # type: ignore[assignment]
        self.settings = dict(settings or {})
        self.path = CGROUP_ROOT / "unstarted"     # set by __enter__

    def set_limit(self, limit_bytes: int | None) -> None:
        systemctl("set-property", "--runtime", self.unit, f"MemoryMax={_size(limit_bytes)}")
        self.limit_bytes = limit_bytes            # type: ignore[assignment]

    def remove(self, timeout: float = 10.0) -> None:
        subprocess.run(["systemctl", "stop", self.unit], capture_output=True, timeout=60)
        subprocess.run(["systemctl", "reset-failed", self.unit], capture_output=True, timeout=60)
        super().remove(timeout)

    def _events(self) -> dict[str, int]:
        try:
            return super()._events()
        except FileNotFoundError:
            # systemd stopped the unit under the scenario (a service's default OOMPolicy=stop
            # does that after one kernel OOM kill in it): say so rather than "no such file".
            state = systemctl("show", "-P", "ActiveState", self.unit)
            result = systemctl("show", "-P", "Result", self.unit)
            raise RuntimeError(f"{self.unit} is gone (systemd: {state}, result {result}): "
                               "its cgroup and its counters went with it") from None


class Slice(_Unit):
    """A slice unit with MemoryMax= (None: no limit) and further [Slice] settings."""

    def __enter__(self) -> "Slice":
        lines = ["[Slice]", f"MemoryMax={_size(self.limit_bytes)}", "MemorySwapMax=0"]
        lines += [f"{k}={v}" for k, v in self.settings.items()]
        self._file = RUNTIME_UNITS / self.unit
        self._file.write_text("\n".join(lines) + "\n")
        systemctl("daemon-reload")
        systemctl("start", self.unit)
        self.path = control_group(self.unit)
        return self

    def remove(self, timeout: float = 10.0) -> None:
        super().remove(timeout)
        if getattr(self, "_file", None) is not None:
            self._file.unlink(missing_ok=True)
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)


class Service(_Unit):
    """A transient service in `slice` (None: system.slice) with MemoryMax= and further
    properties (e.g. ManagedOOMPreference=avoid)."""

    def __init__(self, unit: str, slice_: Slice | None = None, limit_bytes: int | None = None,
                 settings: dict[str, str] | None = None):
        super().__init__(unit, limit_bytes, settings)
        self.slice = slice_

    def __enter__(self) -> "Service":
        props = {"MemoryMax": _size(self.limit_bytes), "MemorySwapMax": "0", **self.settings}
        args = ["systemd-run", "--quiet", f"--unit={self.unit}"]
        if self.slice is not None:
            args.append(f"--slice={self.slice.unit}")
        args += [f"--property={k}={v}" for k, v in props.items()]
        p = subprocess.run([*args, "sleep", "infinity"], capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"systemd-run {self.unit}: {p.stderr.strip()}")
        self.path = control_group(self.unit)
        return self


SLICE, DATABASE_UNIT, HOG_UNIT = "dbglab.slice", "dbglab-db.service", "dbglab-hogs.service"
WHERE = ("unit", "slice", "host")


@contextlib.contextmanager
def placement(where: str, limit: int | None, *, slice_settings: dict[str, str] | None = None,
              database_settings: dict[str, str] | None = None,
              oom_policy: str = "continue") -> Iterator["Placement"]:
    """A scenario's cgroups as systemd units in SLICE, with the limit
        "unit":  on the database's unit (MemoryMax=), the hogs inside that unit too;
        "slice": on the parent slice, the hogs in a sibling unit;
        "host":  nowhere: the host's RAM (`limit` is ignored), the hogs in a sibling unit.
    dbguard is left to find the scope (no [pressure] cgroup). `oom_policy` is the services'
    OOMPolicy=: systemd's default, "stop", stops a whole unit after one kernel OOM kill in it
    (the database with it); tests keep "continue" so the counters outlive a failure and tell it."""
    from lab.scenario import Placement
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    with contextlib.ExitStack() as stack:
        sl = stack.enter_context(Slice(SLICE, limit if where == "slice" else None, slice_settings))
        policy = {"OOMPolicy": oom_policy}
        db = stack.enter_context(Service(DATABASE_UNIT, sl, limit if where == "unit" else None,
                                         {**policy, **(database_settings or {})}))
        if where == "unit":
            yield Placement(db, db, db, discover_scope=True)
            return
        hogs = stack.enter_context(Service(HOG_UNIT, sl, None, policy))
        yield Placement(db, hogs, sl, discover_scope=True)
