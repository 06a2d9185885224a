"""Kernel events as dbguard sees them, and as the audit log records them. Pure: no I/O."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from . import layout
from ..model import Level
from ..sense.procfs import PAGE_SIZE
from ..sense.proctable import boot_time, clk_tck


@dataclass(frozen=True)
class BpfEvent:
    kind: str          # "kill" | "would_kill" | "cancel" | "would_cancel" | "oom_victim" | "breach" | "score_tamper"
                       # | "birth" | "reclaim_fail"
    pid: int
    tgid: int
    comm: str
    ts_ns: int         # wall clock (epoch) nanoseconds
    level: int
    flags: int
    cgroup_id: int     # cgroup v2 id of the task that was running (allocator / writer)
    detail: dict[str, Any] = field(default_factory=dict)
    path: str = "bpf"  # "bpf": dbguard's own program acted; "kernel": the kernel did it


def _str(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(raw: layout.Event, wall_offset_ns: int) -> BpfEvent:
    """A BpfEvent from the raw struct; wall_offset_ns = time.time_ns() - time.monotonic_ns()."""
    kind = layout.EVENT_KINDS.get(raw.kind, f"unknown_{raw.kind}")
    by = {"by_pid": raw.by_pid, "by_comm": _str(raw.by_comm)}
    if kind in ("kill", "would_kill"):
        detail = {"fail_streak": raw.a, "tier": raw.tier,
                  "by_cgroup_policy": bool(raw.flags & layout.EVF_BY_CGROUP),
                  "unlisted": bool(raw.flags & layout.EVF_UNLISTED), "since_first_fail_ns": raw.b}
        if raw.flags & layout.EVF_FOR_OTHER:
            detail.update(for_pid=raw.by_pid, for_comm=by["by_comm"])
        detail["start_time"] = raw.start or None
        if kind == "kill":
            detail["signal_result"] = raw.c
        path = "bpf"
    elif kind in ("cancel", "would_cancel"):
        detail = {"fail_streak": raw.a, "since_first_fail_ns": raw.b, "start_time": raw.start or None,
                  "anon_rss_bytes": raw.pages * PAGE_SIZE, "at_limit": bool(raw.flags & layout.EVF_AT_LIMIT)}
        if kind == "cancel":
            detail["signal_result"] = raw.c
        path = "bpf"
    elif kind in ("oom_victim", "breach"):
        # mark_victim reports kB (<< (PAGE_SHIFT - 10)), not pages
        detail = {"anon_rss_bytes": raw.a * 1024, "file_rss_bytes": raw.b * 1024,
                  "oom_score_adj": raw.c, "tier": raw.tier,
                  "protected": bool(raw.flags & layout.SHIELD),
                  "candidate": bool(raw.flags & layout.EVF_CANDIDATE),
                  "killed_by_dbguard": bool(raw.flags & layout.EVF_KILLED),
                  "trigger_pid": raw.by_pid, "trigger_comm": by["by_comm"]}
        path = "kernel"
    elif kind == "score_tamper":
        old = int(raw.a) - 2000
        detail = {"old_score_adj": None if old == layout.SCORE_UNKNOWN else old,
                  "new_score_adj": raw.c, "start_time": raw.b or None, **by}
        path = "kernel"
    elif kind == "birth":
        detail = {"exec": bool(raw.flags & layout.EVF_EXEC), "parent": raw.a or None}
        path = "kernel"
    elif kind == "reclaim_fail":
        detail, path = {}, "kernel"
    else:
        detail, path = {"a": raw.a, "b": raw.b, "c": raw.c, **by}, "kernel"
    return BpfEvent(kind=kind, pid=raw.pid, tgid=raw.tgid, comm=_str(raw.comm),
                    ts_ns=raw.ts_ns + wall_offset_ns, level=raw.level, flags=raw.flags,
                    cgroup_id=raw.cgroup_id, detail=detail, path=path)


def _level_name(level: int) -> str:
    try:
        return Level(level).name.lower()
    except ValueError:
        return str(level)


def _started(ticks: int | None) -> str:
    """A process start (/proc/PID/stat ticks since boot) as UTC time."""
    if not ticks:
        return "at an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(boot_time() + ticks / clk_tck()))


def _released(d: dict[str, Any]) -> str:
    """What became of a killed victim's memory (kernel.feed releases it), for the result."""
    if "memory_released" not in d:
        return ""
    return "; memory released at once" if d["memory_released"] else f"; memory not released: {d.get('release')}"


# The OOM killer marks a process it finds already dying (task_will_free_mem) without killing it
# or counting an oom_kill: a victim of dbguard's own kill, reaped. Within this window of the kill
# the pid is that victim's (pid reuse takes far longer on a running host).
REAP_WINDOW_NS = 10 * 10**9


class OwnKills:
    """The victims of dbguard's in-kernel kills, to tell the kernel's reaping of one of them
    (oom:mark_victim of a dying task) from a kill of its own."""

    def __init__(self) -> None:
        self._at: dict[int, int] = {}      # tgid -> ts_ns of the kill

    def see(self, ev: BpfEvent) -> BpfEvent:
        """`ev`, an oom_victim event of a process killed by dbguard within REAP_WINDOW_NS, marked
        killed_by_dbguard; a successful kill is remembered."""
        self._at = {t: ns for t, ns in self._at.items() if ev.ts_ns - ns < REAP_WINDOW_NS}
        if ev.kind == "kill" and ev.detail.get("signal_result", 0) == 0:
            self._at[ev.tgid] = ev.ts_ns
        elif ev.kind == "oom_victim" and ev.tgid in self._at and not ev.detail.get("killed_by_dbguard"):
            return replace(ev, detail={**ev.detail, "killed_by_dbguard": True})
        return ev


def event_to_audit(ev: BpfEvent) -> dict[str, Any]:
    """The audit-log record for a kernel event (keys: ts, action, target, reason, level, result, path)."""
    d = ev.detail
    target = f"{ev.comm} (pid {ev.pid})"
    if ev.kind in ("kill", "would_kill"):
        via = ("cgroup policy" if d.get("by_cgroup_policy") else
               "not listed yet: a task of the watched scope" if d.get("unlisted") else "candidate")
        if d.get("for_pid"):
            reason = (f"the scope's largest failing allocator ({via}, tier {d.get('tier')}), killed for "
                      f"{d.get('for_comm')} (pid {d.get('for_pid')}), which may not be killed and whose "
                      f"reclaim failed {d.get('fail_streak')} times in a row at level {_level_name(ev.level)}")
        else:
            reason = (f"allocating while reclaim failed {d.get('fail_streak')} times in a row "
                      f"at level {_level_name(ev.level)} ({via}, tier {d.get('tier')})")
        if ev.kind == "would_kill":
            action, result = "kill", "dry_run: would have sent SIGKILL in kernel"
        else:
            action = "kill"
            rc = d.get("signal_result", 0)
            result = "killed (SIGKILL in kernel" + _released(d) + ")" if rc == 0 else \
                f"failed: the kernel's signal returned {rc}"
    elif ev.kind in ("cancel", "would_cancel"):
        # A client backend's statement: named by pid, process start and memory, never by its text.
        target = f"postgresql client backend (pid {ev.pid})"
        action = "cancel_query"
        n, level = d.get('fail_streak'), _level_name(ev.level)
        why = (f"allocating at its cgroup's limit at level {level}, from which ([bpf] cancel_level) every "
               f"reclaim pass counts, failed or not: {n} in a row" if d.get("at_limit") else
               f"allocating while reclaim failed {n} times in a row at level {level}")
        reason = (f"{why}; holds {d.get('anon_rss_bytes', 0) // 2**20} MiB of anonymous memory, "
                  f"backend started {_started(d.get('start_time'))}")
        rc = d.get("signal_result", 0)
        result = ("dry_run: would have sent SIGINT in kernel" if ev.kind == "would_cancel" else
                  "cancelled (SIGINT in kernel)" if rc == 0 else f"failed: bpf_send_signal returned {rc}")
    elif ev.kind in ("oom_victim", "breach"):
        action = "kernel_oom_kill"
        mib = (d.get("anon_rss_bytes", 0) + d.get("file_rss_bytes", 0)) / 2**20
        reason = (f"kernel OOM killer chose it (rss {mib:.0f} MiB, oom_score_adj {d.get('oom_score_adj')}) "
                  f"while {d.get('trigger_comm')} (pid {d.get('trigger_pid')}) allocated")
        if ev.kind == "breach":
            result = "breach: a protected process was killed by the kernel"
        else:
            result = "killed by the kernel" + (" (a kill candidate)" if d.get("candidate") else "")
            if d.get("killed_by_dbguard"):
                result = "reaped by the kernel after dbguard's in-kernel kill"
    elif ev.kind == "score_tamper":
        action = "oom_score_adj_changed"
        reason = (f"oom_score_adj of a protected process raised from {d.get('old_score_adj')} to "
                  f"{d.get('new_score_adj')} by {d.get('by_comm')} (pid {d.get('by_pid')})")
        result = "tamper: shield lowered"
    else:
        action, reason, result = ev.kind, "unknown BPF event", "unknown"
    return {"ts": ev.ts_ns / 1e9, "action": action, "target": target, "reason": reason,
            "level": _level_name(ev.level), "result": result, "path": ev.path,
            "pid": ev.pid, "detail": dict(d)}
