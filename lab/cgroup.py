"""Memory cgroups for tests and demos, made under dbguard's own cgroup and removed after.

Works on cgroup v1 (the `memory` controller hierarchy) and v2 (unified, with the memory
controller enabled in the parent's subtree_control).
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_memory_cgroup() -> tuple[Path, int]:
    """The memory cgroup this process lives in: (directory, version)."""
    v2_path = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/"), 1
        if hid == "0":
            v2_path = path
    if v2_path is not None and (CGROUP_ROOT / "cgroup.controllers").exists():
        return CGROUP_ROOT / v2_path.lstrip("/"), 2
    raise RuntimeError("no memory cgroup found: mount the cgroup v1 memory controller or cgroup v2")


class MemoryCgroup:
    """A child memory cgroup with a hard limit. Use as a context manager."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        parent, self.version = own_memory_cgroup()
        if self.version == 2:
            # A v2 cgroup with processes cannot have children with controllers: work in a sibling-free leaf.
            ctl = parent / "cgroup.subtree_control"
            if "memory" not in ctl.read_text().split():
                raise RuntimeError(
                    f"memory controller not enabled in {ctl}: echo +memory > {ctl} "
                    "(needs no processes in that cgroup)")
        self.path = parent / (name or f"dbguard-test-{uuid.uuid4().hex[:8]}")
        self.limit_bytes = limit_bytes

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "MemoryCgroup":
        self.path.mkdir()
        try:
            self.set_limit(self.limit_bytes)
        except Exception:
            self.path.rmdir()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left inside (sub-groups too), then rmdir bottom-up. Never leaves a
        cgroup behind if it can help it."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout
        for d in [Path(d) for d, _, _ in os.walk(self.path, topdown=False)]:
            while True:
                for pid in _pids(d):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    # --- control ---------------------------------------------------------------------------
    @property
    def relpath(self) -> str:
        """Path inside its hierarchy, as /proc/PID/cgroup shows it."""
        base = CGROUP_ROOT / "memory" if self.version == 1 else CGROUP_ROOT
        return "/" + str(self.path.relative_to(base))

    def set_limit(self, limit_bytes: int) -> None:
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        self.limit_bytes = limit_bytes

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        return _pids(self.path)

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())

    def unreclaimable(self) -> int:
        """Usage less the page cache, in this cgroup and below: what no reclaim frees without
        swap (shared memory, a database's shared buffers, counts: it is cache that stays)."""
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        cache = int(stat.get("total_cache", stat.get("file", 0))) - int(stat.get("total_shmem", stat.get("shmem", 0)))
        return self.usage() - cache

    def limit_above_held(self, room: int) -> int:
        """The limit set to what the cgroup cannot give back now plus `room`; returns the former."""
        held = self.unreclaimable()
        self.set_limit(held + room)
        return held

    def limit_hits(self) -> int:
        """How often a charge hit the limit (each one a reclaim): memory.failcnt on v1, the
        "max" count of memory.events on v2."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        return self._events().get("max", 0)

    def peak(self) -> int:
        """The highest usage since the cgroup was made."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text())

    def _events(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in (self.path / "memory.events").read_text().splitlines())}

    def oom_kills(self) -> int:
        """Kernel OOM kills inside this cgroup and its sub-groups so far. (v1 counts a kill in
        the victim's own memory cgroup, not in the one whose limit was hit: summed over the
        subtree; v2's memory.events is hierarchical already.)"""
        if self.version == 1:
            total = 0
            for d, _, _ in os.walk(self.path):
                try:
                    text = (Path(d) / "memory.oom_control").read_text()
                except FileNotFoundError:          # a sub-group removed meanwhile
                    continue
                for line in text.splitlines():
                    k, _, v = line.partition(" ")
                    if k == "oom_kill":
                        total += int(v)
            return total
        return self._events().get("oom_kill", 0)

    def subgroup(self, rel: str) -> Path:
        """A sub-group (e.g. "free/a"), made if missing; remove() takes it away with the rest."""
        path = self.path / rel
        path.mkdir(parents=True, exist_ok=True)
        return path

    def child(self, name: str) -> "MemoryCgroup":
        """A sub-group with no limit of its own (made if missing), as a MemoryCgroup: the parent's
        limit is the one that applies to what runs in it. remove() of the parent takes it away."""
        sub = object.__new__(MemoryCgroup)
        sub.version, sub.path, sub.limit_bytes = self.version, self.subgroup(name), None
        return sub

    def preexec(self, rel: str | None = None):
        """For subprocess.Popen(preexec_fn=...): the child joins this cgroup (or its sub-group
        `rel`) before exec."""
        procs = str((self.subgroup(rel) if rel else self.path) / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write("0")
        return join


def _pids(cgroup_dir: Path) -> list[int]:
    try:
        return [int(x) for x in (cgroup_dir / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []
