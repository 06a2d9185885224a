"""Who may be killed, and in what order: THE place where that is decided.

User space (scores, kills), the BPF maps and `dbguard explain` all read the same Verdicts,
computed once per snapshot. Pure: the one fact too costly to sample for every process,
PSS, comes from a reader the daemon gives (`pss_reader`), asked only for processes that
reach a pss_above rule (dbguard.rules.Lazy says why).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ..settings import Config
from ..databases import registry
from ..model import CacheStats, Level, Proc, Role, Snapshot
from ..rules import Lazy, RuleSet

MiB = 1024 * 1024
SHARED_VERDICTS = 4096      # distinct verdicts held for sharing before the pool starts again
# Servers fork the database's processes: their children are protected in the kernel at birth
# (a server no configured database identified too: its children are as much the database's).
INHERITING = registry.server_roles() | {Role.DB_UNKNOWN}
FAMILY_WHY = {
    Role.DB_CHILD: "descended from a database process (COPY ... TO PROGRAM, archive_command, a backup "
                   "tool): never killed, its memory answered through the owning session",
    Role.DB_UNKNOWN: "runs a database server executable that no configured database identified: never "
                     "killed (another server, or one dbguard cannot identify)",
}


@dataclass(frozen=True)
class Verdict:
    """What one process is to the kill path, and why."""

    protected: bool          # never a kill candidate, shielded where possible
    candidate: bool          # may be killed when the level allows
    preferred: bool = False  # killed before ordinary candidates of its tier
    why: str = ""
    rule: str = ""           # what decided: 'rules[2] "batch"', "built-in: database", "default", ...
    rule_index: int | None = None   # the [[policy.rules]] index, when a user rule decided
    action: str = ""         # protect | prefer | kill | default | "" (left alone)
    tier: str = ""
    tier_rank: int = 0       # position of `tier` in policy.tiers: lower dies first
    weight: int = 0          # prefer weight: higher dies first within a tier
    tier_source: str = ""    # what gave the tier: a rule, 'policy.cgroup_tiers."/x/*"', policy.default_tier
    pss_bytes: int | None = None   # PSS, when a pss_above rule needed it and it could be read

    @property
    def order(self) -> tuple[int, int, int]:
        """Kill order of a candidate (with -rss and pid after it): kill rules first, then by
        tier, then by prefer weight. Candidates of equal order are equal to the kernel."""
        return (0 if self.action == "kill" else 1, self.tier_rank, -self.weight)


def _spent(c: CacheStats) -> str:
    if not c.up:
        return "it does not answer"
    return c.why_not or f"at its floor, step {c.shrink_step} of {c.shrink_steps_max}"


def another_dbguard(proc: Proc) -> bool:
    """A `dbguard run` of another instance (another sidecar on the node, a second config):
    `dbguard run ...`, `python -m dbguard run ...` or `python -m dbguard.cli run ...`. Erring
    this way only ever protects a process."""
    argv = proc.cmdline.split()
    for i, arg in enumerate(argv[:-1]):
        named = arg.rsplit("/", 1)[-1] == "dbguard" or arg in ("dbguard", "dbguard.cli") and i and argv[i - 1] == "-m"
        if named and argv[i + 1] == "run":
            return True
    return False


@dataclass(frozen=True)
class KernelView:
    """What the BPF maps must hold for the user-space decision: tgid -> (inherit, tier rank)
    for protected processes, tgid -> tier rank for in-kernel kill candidates, and the
    protected PostgreSQL client backends whose statement the kernel may cancel."""

    protected: dict[int, tuple[bool, int]]
    candidates: dict[int, int]
    cancel: frozenset[int] = frozenset()


@dataclass
class Judge:
    """The verdict rules, with the host facts they need."""

    cfg: Config
    protected_uids: frozenset[int] = frozenset()
    watched_memcg: str | None = None     # "/a/b" relative memcg path; None: every process (host)
    rule_uids: dict[str, int] = field(default_factory=dict)   # [[policy.rules]] user names -> uid
    # PSS in bytes of a process, None when unreadable (gone, not ours): I/O, so given by the
    # daemon (dbguard.sense.procfs.read_pss). Without one, pss_above conditions never hold.
    pss_reader: Callable[[Proc], int | None] | None = None
    rules: RuleSet = field(init=False)
    level: Level = Level.OK              # the level answered now (Policy.decide sets it)
    _memo_snap: Snapshot | None = field(default=None, repr=False)
    _memo_level: Level = field(default=Level.OK, repr=False)
    _memo: dict[int, Verdict] = field(default_factory=dict, repr=False)
    changed: set[int] = field(default_factory=set, repr=False)   # pids whose verdict was worked out anew
    # Of the last snapshot judged: pids whose verdict read PSS (never kept), that are candidates,
    # that are protected, that are cache servers.
    _volatile: set[int] = field(default_factory=set, repr=False)
    _candidates: set[int] = field(default_factory=set, repr=False)
    _protected: set[int] = field(default_factory=set, repr=False)
    _servers: set[int] = field(default_factory=set, repr=False)
    # Equal verdicts held once: thousands of small processes get the same answer.
    _shared: dict[Verdict, Verdict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.rules = RuleSet(self.cfg.policy, self.rule_uids)

    def in_watched(self, proc: Proc) -> bool:
        w = self.watched_memcg
        if w is None or w in ("", "/"):
            return True
        return proc.memcg == w or proc.memcg.startswith(w.rstrip("/") + "/")

    def verdict(self, proc: Proc, role: Role, self_pid: int, limit: int | None = None,
                cache: CacheStats | None = None) -> Verdict:
        """THE place where who may be killed is decided: user space, BPF maps and explain read it.

        Order: safety (never negotiable), database processes by fact (a user rule may only
        protect them too), [kill] protect_exe/protect_users, then [[policy.rules]] first
        match, then [kill] prefer_exe, then the default (a candidate by size)."""
        rules = self.rules
        # The tier before any rule (policy.cgroup_tiers, else default_tier): what `in_tier`
        # conditions test, and the tier of every process whose deciding rule gives none.
        base_tier, base_source = rules.tier_of(proc)
        pss = Lazy(partial(self.pss_reader, proc) if self.pss_reader is not None else None)

        def pss_said() -> str:
            """PSS, where a pss_above rule needed it (explain, audit log)."""
            if not pss.asked:
                return ""
            return "pss unknown (smaps_rollup unreadable)" if pss.value is None else f"pss {pss.value // MiB} MiB"

        def tiered(tier: str, source: str) -> dict:
            tier, source = (tier, source) if tier else (base_tier, base_source)
            return dict(tier=tier, tier_rank=rules.rank(tier), tier_source=source, pss_bytes=pss.value)

        def protect(why: str, rule: str, tier: str = "", index: int | None = None) -> Verdict:
            why = "; ".join(filter(None, [why, pss_said()]))
            return Verdict(True, False, why=why, rule=rule, rule_index=index, action="protect",
                           **tiered(tier, rule))

        if proc.kernel_thread or role is Role.KERNEL_THREAD:
            return protect("kernel thread", "built-in: safety")
        if proc.pid == 1 or role is Role.INIT:
            return protect("PID 1", "built-in: safety")
        if proc.pid == self_pid or role is Role.DBGUARD:
            return protect("dbguard itself", "built-in: safety")
        if another_dbguard(proc):
            return protect("another dbguard (its own kill would leave its databases unguarded)", "built-in: safety")
        named = {"kill.min_rss": self.cfg.kill.min_rss, "limit": limit}   # units.THRESHOLDS
        r = rules.first_match(proc, role, named, base_tier, pss)
        if role.db_family:
            why = FAMILY_WHY.get(role, f"database process ({role.value}): ended only by SQL, never a signal")
            if r is not None and r.action == "protect":
                return protect(f"{why}; {r.label} protects it too ({r.conditions(named)})",
                               f"built-in: database + {r.label}", r.tier, r.index)
            if r is not None:
                why += f"; {r.label} would {r.action} it, but database processes are always protected"
            return protect(why, "built-in: database")
        if role is Role.CACHE_SERVER and cache is not None:
            where = f"cache server of {cache.kind} {cache.name}"
            if not cache.exhausted:
                return protect(f"{where}: it gives memory back when asked (step {cache.shrink_step} of "
                               f"{cache.shrink_steps_max}), so it is never killed for it", "built-in: cache")
            if self.level < Level.CRITICAL:
                return protect(f"{where}: nothing more to give back ({_spent(cache)}); a candidate only at "
                               "critical", "built-in: cache")
        k = self.cfg.kill
        if proc.exe and any(fnmatch.fnmatchcase(proc.exe, g) for g in k.protect_exe):
            return protect(f"kill.protect_exe matches {proc.exe}", "kill.protect_exe")
        if proc.uid in self.protected_uids:
            return protect(f"kill.protect_users has uid {proc.uid}", "kill.protect_users")
        if r is not None and r.action == "protect":
            return protect(f"{r.label} protects it ({r.conditions(named)})", r.label, r.tier, r.index)
        if r is not None:
            rule, index, action, tier, weight = r.label, r.index, r.action, r.tier, r.weight
            said = f"{r.label}: {r.conditions(named)} -> {action}" + (f" (weight {weight})" if weight else "")
        elif proc.exe and any(fnmatch.fnmatchcase(proc.exe, g) for g in k.prefer_exe):
            rule, index, action, tier, weight = "kill.prefer_exe", None, "prefer", "", 1
            said = "kill.prefer_exe: killed first in its tier"
        else:
            rule, index, action, tier, weight = "default", None, "default", "", 0
            said = ""
        left = dict(rule=rule, rule_index=index, **tiered(tier, rule))
        if not proc.exe:
            # Unreadable or just forked: not known well enough to be killed.
            return Verdict(False, False, why="executable unknown (exiting or just forked)", **left)
        if not self.in_watched(proc):
            return Verdict(False, False, why="; ".join(filter(None, [said, "outside the watched memory cgroup",
                                                                      pss_said()])), **left)
        preferred = action == "prefer"
        rss = ", ".join(filter(None, [f"rss {proc.rss_bytes // MiB} MiB", pss_said()]))
        if action != "kill" and proc.rss_bytes < k.min_rss:
            return Verdict(False, False, preferred, "; ".join(filter(None, [
                said, f"{rss} below kill.min_rss {k.min_rss // MiB} MiB"])), **left)
        return Verdict(False, True, preferred, "; ".join(filter(None, [said, f"{rss} in the watched cgroup"])),
                       action=action, weight=weight, **left)

    def verdicts(self, snap: Snapshot) -> dict[int, Verdict]:
        """Every process's verdict, computed once per snapshot (scores, kills, the BPF maps
        and explain all ask within one cycle), and worked out anew only for the processes whose
        facts changed: those snap.changed names when it follows the last snapshot judged, else
        those whose Proc object, role, the limit or the level differ from the last time."""
        if self._memo_snap is snap and self._memo_level == self.level:
            return self._memo
        limit, level, prev = snap.memory.limit_bytes, self.level, self._memo_snap
        # The last judgement, as it stood before this one (_volatile is replaced or changed below
        # only for the pid at hand); its verdicts hold for this limit and level alone.
        last_memo, last_volatile = self._memo, set(self._volatile)
        same = prev is not None and prev.memory.limit_bytes == limit and self._memo_level == level
        last_procs, last_roles = (prev.procs, prev.roles) if prev is not None else ({}, {})
        servers = {c.server_pid: c for c in snap.caches if c.server_pid is not None and not c.pooler}
        procs, roles, other = snap.procs, snap.roles, Role.OTHER
        if prev is not None and snap.changed is not None and snap.since == prev.seq > 0 \
                and self._memo_level == level and prev.memory.limit_bytes == limit:
            memo = dict(self._memo)
            # Set operations over the changed few only: `& procs.keys()` would walk every process.
            todo = {pid for pid in (*snap.changed, *self._volatile, *servers, *self._servers) if pid in procs}
            for pid in [pid for pid in snap.changed if pid not in procs and pid in memo]:
                del memo[pid]
                self._volatile.discard(pid)
                self._candidates.discard(pid)
                self._protected.discard(pid)
        else:
            memo, todo = {}, procs.keys()
            self._volatile, self._candidates, self._protected = set(), set(), set()
        changed: set[int] = set()
        for pid in todo:
            p = procs[pid]
            role = roles.get(pid, other)
            server = servers.get(pid)
            # The process table hands the same Proc object back until it reads the process
            # again, and the last snapshot judged is kept: its Proc, role and verdict are the
            # last judgement of a pid (no copy of them per process), worked out again only
            # when one of its facts changed, not once per cycle for every process on the host.
            if same and server is None and last_procs.get(pid) is p and last_roles.get(pid, other) is role \
                    and pid in last_memo and pid not in last_volatile:
                v = last_memo[pid]
            else:
                v = self.verdict(p, role, snap.self_pid, limit, server)
                v = self._shared.setdefault(v, v)
                changed.add(pid)
            if v.pss_bytes is None and "pss" not in v.why:     # PSS is read afresh each time
                self._volatile.discard(pid)
            else:
                self._volatile.add(pid)
            (self._candidates.add if v.candidate else self._candidates.discard)(pid)
            (self._protected.add if v.protected else self._protected.discard)(pid)
            memo[pid] = v
        if len(self._shared) > SHARED_VERDICTS:
            self._shared = {}
        self._memo, self.changed, self._servers = memo, changed, set(servers)
        self._memo_snap, self._memo_level = snap, level
        return self._memo

    def ranked(self, snap: Snapshot) -> list[tuple[Proc, Verdict]]:
        """Kill candidates with their verdicts in kill order: `kill` rules first, then tier
        ascending, then prefer weight, then the largest."""
        verdicts = self.verdicts(snap)
        out = [(snap.procs[pid], verdicts[pid]) for pid in self._candidates]
        out.sort(key=lambda t: (*t[1].order, -t[0].rss_bytes, t[0].pid))
        return out

    def kernel_view(self, snap: Snapshot) -> KernelView:
        """The BPF maps' share of the decision, so the kernel never disagrees with user space.

        The in-kernel path kills whichever candidate is allocating when reclaim keeps
        failing: it cannot order victims. So it is told only about the candidates user
        space would kill next: every `kill`-rule match, plus the first band (same tier,
        same prefer weight) of the kill order. When that band is gone, the next sync
        lists the next one. Every protected process (but kernel threads) is shielded."""
        protected = {}
        verdicts = self.verdicts(snap)
        for pid in sorted(self._protected):
            proc, role = snap.procs[pid], snap.roles.get(pid, Role.OTHER)
            if not (proc.kernel_thread or role is Role.KERNEL_THREAD):
                protected[pid] = (role in INHERITING, verdicts[pid].tier_rank)
        candidates = {}
        band = None
        for p, v in self.ranked(snap):
            if v.action != "kill":
                band = band or v.order
                if v.order != band:
                    break
            candidates[p.pid] = v.tier_rank
        return KernelView(protected, candidates, kernel_cancellable(snap, protected))


def kernel_cancellable(snap: Snapshot, protected: dict) -> frozenset[int]:
    """The backends the kernel may send SIGINT (PostgreSQL's own cancel) at a failing streak:
    client backends by pg_stat_activity's backend_type, and nothing else. SIGINT is a fast
    shutdown to the postmaster and means other things to auxiliary processes, walsenders,
    autovacuum and background workers; dbguard's own backend is no session."""
    return frozenset(s.pid for db in snap.databases if db.up and db.kind == "postgresql"
                     for s in db.sessions if s.kind == "client backend" and s.pid in protected
                     and snap.roles.get(s.pid) is Role.PG_BACKEND)
