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
