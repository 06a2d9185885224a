"""The kernel's own count of its OOM kills in the watched scope, read every cycle so that each
rise goes to the audit log, BPF or not.

    v2:   memory.events   "oom N" (times the cgroup ran out) and "oom_kill N" (processes the
                          kernel killed), this cgroup and every one below it
    v1:   memory.oom_control "oom_kill N" (no count of the times it ran out)
    host: /proc/vmstat    "oom_kill N"
"""
from __future__ import annotations

import os
from dataclasses import dataclass

VMSTAT = "/proc/vmstat"


@dataclass(frozen=True)
class OomCounts:
    source: str                # the file the counts come from
    kills: int
    ooms: int | None           # None where the kernel keeps no such count (v1, the host)


def parse_oom_counts(text: str, source: str) -> OomCounts | None:
    """memory.events, memory.oom_control or /proc/vmstat text -> OomCounts (None without oom_kill)."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    if "oom_kill" not in values:
        return None
    return OomCounts(source, values["oom_kill"], values.get("oom") if source.endswith("memory.events") else None)


def read_oom_counts(cgroup_dir: str, version: int) -> OomCounts | None:
    """The counts of a cgroup (v1 or v2) or of the host (""); None when they cannot be read
    (a kernel older than 4.13, the cgroup gone: the pressure reading says that one)."""
    if not cgroup_dir:
        path = VMSTAT
    else:
        path = os.path.join(cgroup_dir, "memory.events" if version == 2 else "memory.oom_control")
    try:
        with open(path) as f:
            return parse_oom_counts(f.read(), path)
    except OSError:
        return None


def rise(before: OomCounts | None, now: OomCounts | None) -> str | None:
    """One line when the kernel killed since `before`, else None."""
    if before is None or now is None or now.kills <= before.kills:
        return None
    line = f"{os.path.basename(now.source)} oom_kill {before.kills} -> {now.kills}"
    if before.ooms is not None and now.ooms is not None:
        line += f", oom {before.ooms} -> {now.ooms}"
    return line


def rise_record(scope: str, before: OomCounts | None, now: OomCounts | None, level: str) -> dict | None:
    """The audit record of a rise (path "kernel": what the kernel did; BPF's records name the
    victims, this one counts them), or None."""
    line = rise(before, now)
    if line is None:
        return None
    return {"action": "kernel_oom_count", "target": scope or "host", "reason": line, "level": level,
            "path": "kernel", "result": f"{now.kills - before.kills} kernel OOM kill(s) in the watched scope",
            "oom_kill": now.kills, "oom": now.ooms}


class OomWatch:
    """The counts of the watched scope from one cycle to the next (a new scope starts afresh)."""

    def __init__(self) -> None:
        self.scope: str | None = None
        self.counts: OomCounts | None = None

    def check(self, scope: str, version: int, level: str) -> dict | None:
        """Read the counts now; the audit record of a rise since the last check, or None."""
        before, same = self.counts, scope == self.scope
        self.scope, self.counts = scope, read_oom_counts(scope, version)
        return rise_record(scope, before, self.counts, level) if same else None
