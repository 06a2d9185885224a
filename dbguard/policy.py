"""Decide: from one Snapshot, the pressure level and the actions that answer it.

Pure: no I/O and no clock of its own (time comes in the snapshot), so every rule here is
unit-tested without root, a kernel or a database, and `dbguard explain` shows exactly
what `dbguard run` would do. The one fact too costly to sample for every process, PSS,
comes from a reader the daemon gives (`pss_reader`), asked only for processes that reach
a pss_above rule (dbguard.rules.Lazy says why). The only state is what graduated answers
need to remember across cycles: when a level was last justified (hysteresis, dwell), when
each database's caches last moved, which sessions were already cancelled, and when the
last kills were.
"""
from __future__ import annotations

import fnmatch
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

from .config import Config, DatabaseConfig, Pressure
from .model import (Action, ActionKind, DbSession, DbStats, Level, MemoryReading, Plan, Proc, ProcKey,
                    Role, Snapshot)
from .rules import Lazy, RuleSet

MiB = 1024 * 1024
# The same key is not planned for a second kill this soon: its memory may take a moment to
# show as freed, and in dry-run the process is (rightly) still there.
KILL_REPEAT_AFTER = 10.0
# Scores: a postmaster and its auxiliaries must never be chosen while anything else is left.
SERVER_OOM_SCORE_ADJ = -1000


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def level_of(m: MemoryReading, p: Pressure, margin: float = 0.0) -> tuple[Level, str]:
    """The level the reading justifies, with marks lowered by `margin` (hysteresis), and why.

    On cgroup v1 PSI is host-wide: it may raise the watched cgroup to warn (shrinking
    caches is cheap), but only the cgroup's own figures may justify killing in it.
    """
    r = m.pressing_ratio
    own_psi = m.cgroup_version != 1
    psi_margin = margin * 100
    where = "of the limit" if m.cgroup else "of RAM"
    if m.limit_bytes and r >= p.critical_usage - margin:
        return Level.CRITICAL, f"unreclaimable usage {_pct(r)} {where} >= critical mark {_pct(p.critical_usage)}"
    if m.limit_bytes and r >= p.high_usage - margin:
        return Level.HIGH, f"unreclaimable usage {_pct(r)} {where} >= high mark {_pct(p.high_usage)}"
    if own_psi and p.high_psi_full > 0 and m.psi_full_avg10 >= p.high_psi_full - psi_margin:
        return Level.HIGH, f"PSI full avg10 {m.psi_full_avg10:.1f}% >= high mark {p.high_psi_full:g}%"
    if m.limit_bytes and r >= p.warn_usage - margin:
        return Level.WARN, f"unreclaimable usage {_pct(r)} {where} >= warn mark {_pct(p.warn_usage)}"
    if p.warn_psi_some > 0 and m.psi_some_avg10 >= p.warn_psi_some - psi_margin:
        scope = "" if own_psi else " (host-wide)"
        return Level.WARN, f"PSI some avg10 {m.psi_some_avg10:.1f}%{scope} >= warn mark {p.warn_psi_some:g}%"
    return Level.OK, f"unreclaimable usage {_pct(r)} {where}, PSI some {m.psi_some_avg10:.1f}%"


@dataclass
class LevelTracker:
    """Enter a level at once; leave it only below its marks minus hysteresis, after min_dwell."""

    pressure: Pressure
    level: Level = Level.OK
    justified_at: float = float("-inf")   # last time the reading justified the current level

    def update(self, m: MemoryReading, now: float) -> tuple[Level, str]:
        raw, why = level_of(m, self.pressure)
        if raw >= self.level:
            self.level, self.justified_at = raw, now
            return raw, why
        held, held_why = level_of(m, self.pressure, margin=self.pressure.hysteresis)
        if held >= self.level:
            self.justified_at = now
            return self.level, f"{held_why} (within hysteresis)"
        waited = now - self.justified_at
        if waited < self.pressure.min_dwell:
            return self.level, f"{why}; holding {self.level.name.lower()} for {self.pressure.min_dwell - waited:.1f}s more"
        self.level, self.justified_at = held, now
        return held, why

    def next_mark_bytes(self, m: MemoryReading) -> int | None:
        """Usage at which the next level up starts (wake the loop there), None at the top."""
        if not m.limit_bytes:
            return None
        marks = {Level.OK: self.pressure.warn_usage, Level.WARN: self.pressure.high_usage,
                 Level.HIGH: self.pressure.critical_usage}
        mark = marks.get(self.level)
        return None if mark is None else int(mark * m.limit_bytes) + m.reclaimable_bytes


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
        tier, then by prefer weight."""
        return (0 if self.action == "kill" else 1, self.tier_rank, -self.weight)

    @property
    def band(self) -> tuple[int, int, int]:
        """Candidates with the same band are equal to the kernel (see Policy.kernel_view)."""
        return self.order


@dataclass(frozen=True)
class KernelView:
    """What the BPF maps must hold for the user-space decision: tgid -> (inherit, tier rank)
    for protected processes, tgid -> tier rank for in-kernel kill candidates."""

    protected: dict[int, tuple[bool, int]]
    candidates: dict[int, int]


# Servers fork the database's processes: their children are protected in the kernel at birth.
_INHERITING = (Role.POSTMASTER, Role.MYSQLD)


@dataclass
class Policy:
    cfg: Config
    dry_run: bool = False
    can_lower_scores: bool = False
    protected_uids: frozenset[int] = frozenset()
    watched_memcg: str | None = None     # "/a/b" relative memcg path; None: every process (host)
    rule_uids: dict[str, int] = field(default_factory=dict)   # [[policy.rules]] user names -> uid
    limit_bytes: int | None = None       # the watched limit, for "Nx limit" rules; set from snapshots
    # PSS in bytes of a process, None when unreadable (gone, not ours): I/O, so given by the
    # daemon (dbguard.sense.procfs.read_pss). Without one, pss_above conditions never hold.
    pss_reader: Callable[[Proc], int | None] | None = None
    levels: LevelTracker = field(init=False)
    rules: RuleSet = field(init=False)
    _cache_moved_at: dict[str, float] = field(default_factory=dict)
    _cancelled: dict[tuple[str, int], float] = field(default_factory=dict)
    _terminated: set[tuple[str, int]] = field(default_factory=set)
    _kill_times: deque = field(default_factory=lambda: deque(maxlen=10_000))
    _killed: dict[ProcKey, float] = field(default_factory=dict)
    _scored: dict[ProcKey, int] = field(default_factory=dict)
    _memo_snap: Snapshot | None = field(default=None, repr=False)
    _memo: dict[int, Verdict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.levels = LevelTracker(self.cfg.pressure)
        self.rules = RuleSet(self.cfg.policy, self.rule_uids)

    @property
    def db_configs(self) -> dict[str, DatabaseConfig]:
        return {d.name: d for d in self.cfg.databases}

    # --- who is who --------------------------------------------------------------------
    def in_watched(self, proc: Proc) -> bool:
        w = self.watched_memcg
        if w is None or w in ("", "/"):
            return True
        return proc.memcg == w or proc.memcg.startswith(w.rstrip("/") + "/")

    def thresholds(self) -> dict[str, int | None]:
        """The named thresholds a rule's rss_above can take a multiple of (dbguard.units.THRESHOLDS)."""
        return {"kill.min_rss": self.cfg.kill.min_rss, "limit": self.limit_bytes}

    def verdict(self, proc: Proc, role: Role, self_pid: int) -> Verdict:
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
        named = self.thresholds()
        r = rules.first_match(proc, role, named, base_tier, pss)
        if role.is_database:
            why = f"database process ({role.value}): ended only by SQL, never a signal"
            if r is not None and r.action == "protect":
                return protect(f"{why}; {r.label} protects it too ({r.conditions(named)})",
                               f"built-in: database + {r.label}", r.tier, r.index)
            if r is not None:
                why += f"; {r.label} would {r.action} it, but database processes are always protected"
            return protect(why, "built-in: database")
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
        and explain all ask within one cycle)."""
        if self._memo_snap is not snap:
            self.limit_bytes = snap.memory.limit_bytes
            self._memo = {pid: self.verdict(p, snap.roles.get(pid, Role.OTHER), snap.self_pid)
                          for pid, p in snap.procs.items()}
            self._memo_snap = snap
        return self._memo

    def ranked(self, snap: Snapshot) -> list[tuple[Proc, Verdict]]:
        """Kill candidates with their verdicts in kill order: `kill` rules first, then tier
        ascending, then prefer weight, then the largest."""
        verdicts = self.verdicts(snap)
        out = [(p, verdicts[pid]) for pid, p in snap.procs.items() if verdicts[pid].candidate]
        out.sort(key=lambda t: (*t[1].order, -t[0].rss_bytes, t[0].pid))
        return out

    def candidates(self, snap: Snapshot) -> list[Proc]:
        """Kill candidates in kill order (see ranked)."""
        return [p for p, _ in self.ranked(snap)]

    def kernel_view(self, snap: Snapshot) -> KernelView:
        """The BPF maps' share of the decision, so the kernel never disagrees with user space.

        The in-kernel path kills whichever candidate is allocating when reclaim keeps
        failing: it cannot order victims. So it is told only about the candidates user
        space would kill next: every `kill`-rule match, plus the first band (same tier,
        same prefer weight) of the kill order. When that band is gone, the next sync
        lists the next one. Every protected process (but kernel threads) is shielded."""
        protected = {}
        verdicts = self.verdicts(snap)
        for pid, proc in snap.procs.items():
            role = snap.roles.get(pid, Role.OTHER)
            if proc.kernel_thread or role is Role.KERNEL_THREAD:
                continue
            v = verdicts[pid]
            if v.protected:
                protected[pid] = (role in _INHERITING, v.tier_rank)
        candidates = {}
        band = None
        for p, v in self.ranked(snap):
            if v.action != "kill":
                band = band or v.band
                if v.band != band:
                    break
            candidates[p.pid] = v.tier_rank
        return KernelView(protected, candidates)

    # --- deciding ----------------------------------------------------------------------
    def decide(self, snap: Snapshot) -> Plan:
        self.limit_bytes = snap.memory.limit_bytes
        level, why = self.levels.update(snap.memory, snap.ts)
        caches, held = self._caches(snap, level)
        actions = (self._scores(snap) + caches + self._idle_sessions(snap, level)
                   + self._runaway(snap, level) + self._kills(snap, level))
        if self.dry_run:
            actions = [_dry(a) for a in actions]
        self._forget(snap)
        return Plan(level, why, tuple(actions), tuple(held))

    def _act(self, kind: ActionKind, reason: str, **kw) -> Action:
        return Action(kind=kind, reason=reason, **kw)

    def _scores(self, snap: Snapshot) -> list[Action]:
        prot = self.cfg.protection
        out = []
        for pid, proc in snap.procs.items():
            role = snap.roles.get(pid, Role.OTHER)
            want, why = None, ""
            if role.is_database and prot.lower_databases and self.can_lower_scores:
                server = role in (Role.POSTMASTER, Role.PG_AUXILIARY)
                want = SERVER_OOM_SCORE_ADJ if server else prot.backend_oom_score_adj
                why = (f"shield {role.value}: the kernel OOM killer must choose anything else first"
                       if server else f"shield {role.value}, yet leave the kernel a way out")
                if proc.oom_score_adj <= want:
                    continue
            elif role is Role.OTHER and prot.raise_candidates:
                v = self.verdicts(snap)[pid]
                want = prot.candidate_oom_score_adj
                if not v.candidate or proc.oom_score_adj >= want:
                    continue
                why = f"kill candidate ({v.why}): the kernel OOM killer should choose it before the database"
            if want is None or self._scored.get(proc.key) == want:
                continue
            self._scored[proc.key] = want
            out.append(self._act(ActionKind.SET_OOM_SCORE_ADJ, why, pid=pid, start_time=proc.start_time,
                                 target=_proc_name(proc), value=want))
        return out

    def _caches(self, snap: Snapshot, level: Level) -> tuple[list[Action], list[tuple[str, str]]]:
        """Shrink and grow actions, and the grows held back (target, why)."""
        out, held = [], []
        pres = self.cfg.pressure
        dwell = pres.min_dwell
        m = snap.memory
        # A level held only by hysteresis or dwell means the pressure has gone: shrinking
        # then costs the database its cache for nothing.
        pressed_now = level_of(m, pres)[0] >= Level.WARN
        # A grow must not by itself bring back the warn level: that would shrink again (flapping).
        room = pres.warn_usage - pres.hysteresis
        for db in snap.databases:
            if not db.up or db.shrink_steps_max == 0 and db.shrink_step == 0:
                continue
            since = snap.ts - self._cache_moved_at.get(db.name, float("-inf"))
            target = f"{db.kind} {db.name}"
            # Above warn, pressure is climbing: one step per cycle is not too fast.
            if level >= Level.WARN and pressed_now and db.shrink_step < db.shrink_steps_max and (
                    level >= Level.HIGH or since >= dwell):
                self._cache_moved_at[db.name] = snap.ts
                out.append(self._act(ActionKind.SHRINK_CACHE,
                                     f"level {level.name.lower()}: shrink caches to step "
                                     f"{db.shrink_step + 1} of {db.shrink_steps_max}",
                                     target=target, database=db.name, value=db.shrink_step + 1))
            elif level == Level.OK and db.shrink_step > 0 and since >= dwell:
                after = m.pressing_ratio + db.grow_bytes / m.limit_bytes if m.limit_bytes else 0.0
                if db.grow_bytes and after >= room:
                    held.append((target, f"caches held at step {db.shrink_step} of {db.shrink_steps_max}: "
                                 f"growing {db.grow_bytes // MiB} MiB would bring unreclaimable usage to "
                                 f"{_pct(after)} of the limit, not under {_pct(room)} (warn mark minus "
                                 f"hysteresis)"))
                    continue
                self._cache_moved_at[db.name] = snap.ts
                out.append(self._act(ActionKind.RESTORE_CACHE,
                                     f"pressure has passed for {dwell:g}s: grow caches back to step "
                                     f"{db.shrink_step - 1} (0 = as configured)",
                                     target=target, database=db.name, value=db.shrink_step - 1))
        return out, held

    def _idle_sessions(self, snap: Snapshot, level: Level) -> list[Action]:
        if level < Level.WARN:
            return []
        out = []
        for db in snap.databases:
            dc = self.db_configs.get(db.name)
            if not db.up or dc is None or dc.close_idle_after <= 0:
                continue
            for s in db.sessions:
                if s.state == "idle" and s.age_seconds >= dc.close_idle_after and \
                        (db.name, s.pid) not in self._terminated:
                    self._terminated.add((db.name, s.pid))
                    out.append(self._act(ActionKind.TERMINATE_SESSION,
                                         f"level {level.name.lower()}: idle for {s.age_seconds:.0f}s "
                                         f"(close_idle_after {dc.close_idle_after:g}s)",
                                         pid=s.pid, target=_session_name(db, s), database=db.name))
        return out

    def _runaway(self, snap: Snapshot, level: Level) -> list[Action]:
        if level < Level.HIGH:
            return []
        out = []
        for db in snap.databases:
            dc = self.db_configs.get(db.name)
            if not db.up or dc is None:
                continue
            active = [s for s in db.sessions if s.state != "idle" and s.memory_bytes >= dc.runaway_min_bytes
                      and (db.name, s.pid) not in self._terminated]
            if not active:
                continue
            s = max(active, key=lambda s: s.memory_bytes)
            key = (db.name, s.pid)
            held = f"holds {s.memory_bytes // MiB} MiB, the most of any session (runaway_min_bytes " \
                   f"{dc.runaway_min_bytes // MiB} MiB)"
            if key not in self._cancelled:
                self._cancelled[key] = snap.ts
                out.append(self._act(ActionKind.CANCEL_QUERY, f"level {level.name.lower()}: session {held}",
                                     pid=s.pid, target=_session_name(db, s), database=db.name))
            elif snap.ts - self._cancelled[key] >= dc.terminate_after:
                self._terminated.add(key)
                out.append(self._act(ActionKind.TERMINATE_SESSION,
                                     f"level {level.name.lower()}: still running {dc.terminate_after:g}s after "
                                     f"cancel and {held}", pid=s.pid, target=_session_name(db, s),
                                     database=db.name))
        return out

    def _kills(self, snap: Snapshot, level: Level) -> list[Action]:
        k = self.cfg.kill
        m = snap.memory
        if level < Level.HIGH or not k.enabled or not m.limit_bytes:
            return []
        now = snap.ts
        if self._kill_times and now - self._kill_times[-1] < k.min_interval:
            return []
        recent = sum(1 for t in self._kill_times if now - t < 60)
        # Kill enough to get back under the high mark (minus hysteresis), not just one:
        # with fast hogs, one kill per cycle loses the race.
        goal = self.cfg.pressure.high_usage - self.cfg.pressure.hysteresis
        excess = m.usage_bytes - m.reclaimable_bytes - goal * m.limit_bytes
        # The cgroup's own PSI full justifies one kill even under the usage goal (thrashing);
        # a level merely held by hysteresis or dwell does not.
        thrashing = m.cgroup_version != 1 and 0 < self.cfg.pressure.high_psi_full <= m.psi_full_avg10
        out = []
        held = None          # the band of a candidate killed a moment ago and not gone yet
        for proc, v in self.ranked(snap):
            # A `kill` rule's processes all go once kills are allowed; the rest only until
            # usage is back under the goal.
            if excess <= 0 and (out or not thrashing) and v.action != "kill" or recent >= k.max_per_minute:
                break
            if held is not None and v.band != held:
                break        # never reach past a tier whose kill is still under way
            if now - self._killed.get(proc.key, float("-inf")) < KILL_REPEAT_AFTER:
                if v.action != "kill":
                    held = v.band
                continue
            self._killed[proc.key] = now
            recent += 1
            excess -= proc.rss_bytes
            first = "kill rule match" if v.action == "kill" else \
                f"next kill candidate (tier {v.tier})" if len(self.rules.tiers) > 1 else "largest kill candidate"
            out.append(self._act(ActionKind.KILL,
                                 f"level {level.name.lower()}: {first} ({v.why}); usage must "
                                 f"fall below {_pct(goal)} of the limit",
                                 pid=proc.pid, start_time=proc.start_time, target=_proc_name(proc)))
        if out:
            self._kill_times.append(now)
        return out

    def kill_not_done(self, a: Action) -> None:
        """The executor skipped a planned kill (pressure fell first): the process is a
        candidate like any other again, so the next kill in its tier is not passed over."""
        if a.pid is not None and a.start_time is not None:
            self._killed.pop(ProcKey(a.pid, a.start_time), None)

    def _forget(self, snap: Snapshot) -> None:
        """Drop memories of processes and sessions that are gone (pids get reused)."""
        live = {p.key for p in snap.procs.values()}
        for d in (self._scored, self._killed):
            for key in [key for key in d if key not in live]:
                del d[key]
        sessions = {(db.name, s.pid) for db in snap.databases if db.up for s in db.sessions}
        up = {db.name for db in snap.databases if db.up}
        for key in [key for key in self._cancelled if key[0] in up and key not in sessions]:
            del self._cancelled[key]
        self._terminated &= sessions | {k for k in self._terminated if k[0] not in up}


def _dry(a: Action) -> Action:
    return replace(a, dry_run=True)


def _proc_name(p: Proc) -> str:
    return f"{p.comm} (pid {p.pid}, rss {p.rss_bytes // MiB} MiB)"


def _session_name(db: DbStats, s: DbSession) -> str:
    what = "backend" if db.kind == "postgresql" else "connection"
    return f"{db.kind} {db.name} {what} {s.pid} ({s.user or '?'}, {s.memory_bytes // MiB} MiB)"
