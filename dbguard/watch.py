"""One watched scope (sense/scope.py): its pressure monitor and wake-ups, its databases, its
level and the policy's memory for it, the usage mark the kernel watches and its kernel OOM
count. The daemon answers each scope on its own, with its own Policy: a hog in pod A is
answered inside A while pod B, at rest, is left alone, and B's pressure is answered in B.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .assess import Assessment
from .settings import Config, DatabaseConfig
from .host import CAP_SYS_RESOURCE, has_capability, resolve_rule_users, resolve_users
from .model import Level, Plan, Snapshot
from .policy import Policy, PolicyState
from .sense.procfs import read_pss
from .sense.events import OomWatch
from .sense.pressure import PressureMonitor
from .sense.scope import Scope, relative_memcg


@dataclass
class Watch:
    scope: Scope
    databases: tuple[str, ...]          # the [[databases]] names answered here
    monitor: PressureMonitor
    state: PolicyState = field(default_factory=PolicyState)    # survives reloads: owned here, not by the policy
    policy: Policy | None = None
    threshold: int | None = None        # the usage mark the kernel watches now (v1)
    ooms: OomWatch = field(default_factory=OomWatch)
    deferred: set[str] = field(default_factory=set)             # targets whose deferred answer was logged
    woken_by: tuple[str, ...] = ("first cycle",)                # what woke the loop for this cycle (woken_by())

    @property
    def name(self) -> str:
        """The audit's `scope` field and the metrics' `cgroup` label: the cgroup read, or "host"."""
        return self.cgroup or "host"

    @property
    def cgroup(self) -> str:
        """The memory cgroup directory read ("" for the host)."""
        return self.monitor.cgroup_dir

    @property
    def memcg(self) -> str | None:
        """The /proc/PID/cgroup form of it; None for the host (every process)."""
        return relative_memcg(self.cgroup)

    @property
    def level(self) -> Level:
        return self.state.levels.level

    def describe(self, databases: bool = True) -> str:
        said = f"{self.cgroup or 'host memory'} ({self.scope.why})"
        return f"{said}: {', '.join(self.databases) or 'no database'}" if databases else said

    def newly_deferred(self, plan: Plan) -> dict[str, str]:
        """The answers this plan puts off that the last one did not (said once, when it starts)."""
        deferred = dict(plan.deferred)
        new = {t: deferred[t] for t in deferred.keys() - self.deferred}
        self.deferred = set(deferred)
        return new

    def arm(self, mark: int | None) -> None:
        """Have the kernel wake the loop when usage crosses `mark` (v1), if not already set so."""
        if mark != self.threshold:
            self.monitor.set_usage_threshold(mark)
            self.threshold = mark

    def close(self) -> None:
        self.monitor.close()


def build_policy(cfg: Config, db_configs: tuple[DatabaseConfig, ...], dry_run: bool, watch: Watch,
                 several: bool) -> Policy:
    full = dataclasses.replace(cfg, databases=db_configs)
    return Policy(full, dry_run=dry_run, can_lower_scores=has_capability(CAP_SYS_RESOURCE),
                  protected_uids=resolve_users(cfg.kill.protect_users), watched_memcg=watch.memcg,
                  rule_uids=resolve_rule_users(cfg), pss_reader=read_pss,
                  scope=watch.name if several else "")


def build_policies(cfg: Config, watches: list[Watch], db_configs: tuple[DatabaseConfig, ...], dry_run: bool) -> None:
    """Each watch's Policy, anew (a reload, a database found); the memory stays in the watch."""
    for w in watches:
        w.policy = build_policy(cfg, db_configs, dry_run, w, len(watches) > 1)


@dataclass(frozen=True)
class Answer:
    """What one cycle read, judged and planned in one scope."""

    watch: Watch
    snap: Snapshot
    assessment: Assessment
    plan: Plan


def woken_by(own: set[str], others: set[str], fd: bool) -> tuple[str, ...]:
    """What woke the loop for a scope's cycle, as its level_change record says: the scope's own
    kernel sources ("psi": its PSI trigger, "limit": it reached its limit or ran out, "high":
    throttling at a memory.high in it, "usage": its v1 usage mark), "another scope" when another
    scope's fired, "signal or BPF event" for the daemon's descriptors, and "interval" when
    nothing did (the poll)."""
    said = sorted(own - {"fd"})
    if others - {"fd"}:
        said.append("another scope")
    if fd:
        said.append("signal or BPF event")
    return tuple(said) or ("interval",)


def note_woken_by(watches: list[Watch], fired: set[str]) -> None:
    """Each scope's woken_by after a wait that returned `fired` (said in its next level_change
    record: which trigger, if any, brought the change to light)."""
    for w in watches:
        others = set().union(*(v.monitor.fired for v in watches if v is not w))
        w.woken_by = woken_by(w.monitor.fired, others, "fd" in fired - w.monitor.fired - others)


def watching(watches: list[Watch]) -> str:
    """What the start log and record say is watched: the scope and why; several: each with its databases."""
    if len(watches) == 1:
        return watches[0].describe(databases=False)
    return f"{len(watches)} scopes: " + "; ".join(w.describe() for w in watches)


def wakeups(w: Watch, interval: float) -> str:
    """One line for the start log: what wakes the loop for this scope."""
    m = w.monitor
    said = [f"PSI trigger '{m.trigger_spec}' on {m.psi_path}" if m.trigger_active
            else f"no PSI trigger ({m.trigger_error}); polling every {interval:g}s"]
    if m.trigger_note:
        said.append(m.trigger_note)
    if m.limit_events:
        said.append(f"the kernel's limit events ({m.limit_events})")
    if not (m.own_psi or m.count_host_psi):
        said.append("no PSI of its own (cgroup v1): its level comes from its usage, the host's stalls "
                    "only wake the loop")
    return "; ".join(said)
