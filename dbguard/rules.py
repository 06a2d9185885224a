"""Custom OOM policies: the [[policy.rules]] a DBA or platform team writes, and what they mean.

Pure: rules are matched against facts dbguard already has (Proc, its Role, named
thresholds), so `dbguard explain`, the user-space kill path and the BPF maps all read the
same answer from `dbguard.policy.Policy.verdict`, which consults `RuleSet.first_match`.

Semantics, in one place (docs/policies.md says the same for operators):
- Rules are tried in order; the first rule whose every given condition holds decides the
  process's action and tier. A condition given as a list holds when any item does.
- Conditions: role (dbguard.model.Role values), cgroup (glob on the memory cgroup path as
  in /proc/PID/cgroup), exe (glob on the executable path), user (name or uid), rss_above
  (a size, or a multiple of a named threshold: "2x kill.min_rss", "0.25x limit"), pss_above
  (the same forms, on PSS), in_tier (the tier policy.cgroup_tiers or default_tier gives the
  process: what it is in before any rule speaks).
- Actions: protect (never a candidate, shielded in the kernel), prefer (a candidate killed
  before the others of its tier, higher weight first), kill (killed as soon as the level
  allows kills, before anything else and whatever the tier), default (a candidate by size).
- Tiers: `policy.tiers` lists them in kill order; lower tiers are emptied first. A process's
  tier is the deciding rule's `tier` if it gives one, else the first `policy.cgroup_tiers`
  glob matching its memory cgroup (file order), else `policy.default_tier`.
- Globs are fnmatch globs: `*` also crosses `/`, so "/batch.slice/*" covers the whole subtree.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from .errors import ConfigError
from .model import Proc, Role
from .units import Threshold, parse_threshold, toml_key

if TYPE_CHECKING:
    from .settings import PolicyConfig, RuleConfig

ACTIONS = ("protect", "prefer", "kill", "default")
ROLE_NAMES = tuple(r.value for r in Role)
_TIER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
MiB = 1024 * 1024


def compile_glob(pattern: str, path: str) -> re.Pattern:
    """fnmatch silently takes an unclosed `[` literally; a typo there would never match, so refuse it."""
    if not pattern:
        raise ConfigError(f"{path}: empty pattern; leave the key out to match anything")
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":    # a ']' first in a set is a member
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                raise ConfigError(f"{path}: bad glob {pattern!r}: '[' without a closing ']' "
                                  "(write [[] for a literal '[')")
            i = j
        i += 1
    return re.compile(fnmatch.translate(pattern))


class Lazy:
    """A fact that costs I/O to learn (PSS): read on first use, at most once.

    Why lazy rather than a sampler that reads PSS for every process whenever some rule has
    pss_above: smaps_rollup walks the process's page tables under its mmap lock, which costs
    time in proportion to its size and waits on a hog that is busy faulting pages in. Read
    lazily, first-match is also the cost model: a process decided by an earlier rule, or
    ruled out by a rule's cheaper conditions (tested first), is never read, and rules stay
    pure: they call the function they are given (dbguard.sense.procfs.read_pss in the
    daemon, a dict in the tests) and never touch /proc themselves.
    """

    __slots__ = ("_read", "asked", "value")

    def __init__(self, read: Callable[[], int | None] | None):
        self._read = read
        self.asked = False
        self.value: int | None = None

    def __call__(self) -> int | None:
        if not self.asked:
            self.asked = True
            self.value = self._read() if self._read is not None else None
        return self.value


@dataclass(frozen=True)
class Rule:
    index: int                        # position in [[policy.rules]], 0-based as in error paths
    name: str
    roles: frozenset[str]
    cgroup: tuple[re.Pattern, ...]
    exe: tuple[re.Pattern, ...]
    users: frozenset[int] | None      # None: any user
    rss_above: Threshold | None
    pss_above: Threshold | None
    in_tier: frozenset[str]           # empty: any tier
    action: str
    weight: int                       # prefer only; 0 otherwise
    tier: str                         # "" : the default tier
    source: "RuleConfig"

    @property
    def label(self) -> str:
        return f'rules[{self.index}]' + (f' "{self.name}"' if self.name else "")

    def matches(self, proc: Proc, role: Role, named: Mapping[str, int | None], tier: str,
                pss: Callable[[], int | None] | None = None) -> bool:
        """Whether every condition holds. `tier` is the process's tier before any rule
        (RuleSet.tier_of); `pss` gives its PSS (None: unknown), asked only when every cheaper
        condition held; without it a pss_above condition never holds."""
        if self.roles and role.value not in self.roles:
            return False
        if self.in_tier and tier not in self.in_tier:
            return False
        if self.users is not None and proc.uid not in self.users:
            return False
        if self.cgroup and not any(g.match(proc.memcg) for g in self.cgroup):
            return False
        if self.exe and not any(g.match(proc.exe) for g in self.exe):
            return False
        if self.rss_above is not None:
            limit = self.rss_above.resolve(named)
            if limit is None or proc.rss_bytes <= limit:
                return False
        if self.pss_above is not None:
            limit = self.pss_above.resolve(named)
            # PSS never exceeds RSS (a resident page counts 1/mapcount of itself): a process
            # whose RSS is not above the threshold cannot match, and is not read.
            if limit is None or proc.rss_bytes <= limit:
                return False
            value = pss() if pss is not None else None
            if value is None or value <= limit:      # None: smaps_rollup unreadable (gone, not ours)
                return False
        return True

    def conditions(self, named: Mapping[str, int | None] | None = None) -> str:
        """The rule's conditions in words, for explain."""
        s = self.source
        parts = [f"{k} {'|'.join(getattr(s, k))}" for k in ("role", "cgroup", "exe", "user", "in_tier")
                 if getattr(s, k)]
        for what, t in (("rss", self.rss_above), ("pss", self.pss_above)):
            if t is not None:
                limit = t.resolve(named or {})
                at = "" if t.size is not None else \
                    f" (= {limit // MiB} MiB)" if limit is not None else " (no such threshold now)"
                parts.append(f"{what} > {t.text}{at}")
        return ", ".join(parts) or "every process"


class RuleSet:
    """The compiled [[policy.rules]] plus the tier order."""

    def __init__(self, cfg: "PolicyConfig", uids: Mapping[str, int] | None = None):
        uids = uids or {}
        self.tiers = cfg.tiers
        self.default_tier = cfg.default_tier or cfg.tiers[0]
        self._rank = {t: i for i, t in enumerate(cfg.tiers)}
        self.cgroup_tiers = tuple((compile_glob(g, _tier_path(g)), tier, _tier_path(g))
                                  for g, tier in cfg.cgroup_tiers)
        self.rules = tuple(_compile(r, i, uids) for i, r in enumerate(cfg.rules))

    def rank(self, tier: str) -> int:
        return self._rank.get(tier or self.default_tier, self._rank[self.default_tier])

    def tier_of(self, proc: Proc) -> tuple[str, str]:
        """(tier, where it comes from) before any rule: the first policy.cgroup_tiers glob
        that matches the memory cgroup, in file order, else the default tier."""
        for glob, tier, path in self.cgroup_tiers:
            if glob.match(proc.memcg):
                return tier, path
        return self.default_tier, "policy.default_tier"

    def first_match(self, proc: Proc, role: Role, named: Mapping[str, int | None], tier: str | None = None,
                    pss: Callable[[], int | None] | None = None) -> Rule | None:
        tier = self.tier_of(proc)[0] if tier is None else tier
        for r in self.rules:
            if r.matches(proc, role, named, tier, pss):
                return r
        return None


def _tier_path(glob: str) -> str:
    return f"policy.cgroup_tiers.{toml_key(glob)}"


def _user_ids(names: tuple[str, ...], uids: Mapping[str, int]) -> frozenset[int] | None:
    if not names:
        return None
    # An unresolved name matches nobody; the validator refuses a config with one (validate.uid_of).
    return frozenset(int(n) if n.isdigit() else uids[n] for n in names if n.isdigit() or n in uids)


def _compile(r: "RuleConfig", index: int, uids: Mapping[str, int]) -> Rule:
    path = f"policy.rules[{index}]"
    cgroup = tuple(compile_glob(g, f"{path}.cgroup") for g in r.cgroup)
    exe = tuple(compile_glob(g, f"{path}.exe") for g in r.exe)
    return Rule(index=index, name=r.name, roles=frozenset(r.role),
                # a list holding "*" holds for every process: no condition at all
                cgroup=() if "*" in r.cgroup else cgroup, exe=() if "*" in r.exe else exe,
                users=_user_ids(r.user, uids),
                rss_above=parse_threshold(r.rss_above, f"{path}.rss_above") if r.rss_above else None,
                pss_above=parse_threshold(r.pss_above, f"{path}.pss_above") if r.pss_above else None,
                in_tier=frozenset(r.in_tier), action=r.action, weight=r.weight if r.action == "prefer" else 0,
                tier=r.tier, source=r)


# --- validation (config time: no host facts, so user names are checked at start) ---------------

def validate(cfg: "PolicyConfig") -> list[str]:
    """Raise ConfigError (one line, key path) for a bad [policy]; return warnings."""
    if not cfg.tiers:
        raise ConfigError('policy.tiers: give at least one tier, e.g. tiers = ["default"]')
    for t in cfg.tiers:
        if not _TIER_NAME.match(t):
            raise ConfigError(f"policy.tiers: {t!r} is not a tier name (letters, digits, '.', '_', '-')")
    dup = [t for t in cfg.tiers if cfg.tiers.count(t) > 1]
    if dup:
        raise ConfigError(f"policy.tiers: {dup[0]!r} is listed twice")
    tiers = ", ".join(cfg.tiers)
    if cfg.default_tier and cfg.default_tier not in cfg.tiers:
        raise ConfigError(f"policy.default_tier: unknown tier {cfg.default_tier!r}; policy.tiers has {tiers}")
    for glob, tier in cfg.cgroup_tiers:
        path = _tier_path(glob)
        compile_glob(glob, path)
        if tier not in cfg.tiers:
            raise ConfigError(f"{path}: unknown tier {tier!r}; policy.tiers has {tiers}")
    names: dict[str, int] = {}
    for i, r in enumerate(cfg.rules):
        path = f"policy.rules[{i}]"
        if r.action not in ACTIONS:
            raise ConfigError(f"{path}.action: must be one of {', '.join(ACTIONS)}, got {r.action!r}")
        if r.tier and r.tier not in cfg.tiers:
            raise ConfigError(f"{path}.tier: unknown tier {r.tier!r}; policy.tiers has {tiers}")
        for t in r.in_tier:
            if t not in cfg.tiers:
                raise ConfigError(f"{path}.in_tier: unknown tier {t!r}; policy.tiers has {tiers}")
        for role in r.role:
            if role not in ROLE_NAMES:
                raise ConfigError(f"{path}.role: unknown role {role!r}; roles are {', '.join(ROLE_NAMES)}")
            if Role(role).never_signalled and r.action != "protect":
                raise ConfigError(
                    f"{path}: role {role} is always protected (built-in rule); action {r.action!r} cannot "
                    "apply to it: use action = \"protect\" or leave that role out")
        for u in r.user:
            if not u:
                raise ConfigError(f"{path}.user: empty user name")
        if r.name:
            if r.name in names:
                raise ConfigError(f"{path}.name: {r.name!r} is also the name of policy.rules[{names[r.name]}]")
            names[r.name] = i
        _compile(r, i, {})                 # globs, rss_above and pss_above
    return _shadowed_tiers(cfg.cgroup_tiers) + _shadowed(cfg.rules, cfg.tiers) + _overriding(cfg)


def _conditions(r: "RuleConfig", tiers: tuple[str, ...] = ()) -> dict[str, object]:
    """The rule's effective conditions ("*" globs hold for everything, and so does an in_tier
    listing every tier: they are no condition)."""
    out: dict[str, object] = {}
    for key in ("role", "cgroup", "exe", "user", "in_tier"):
        items = frozenset(getattr(r, key))
        if items and "*" not in items and not (key == "in_tier" and items >= set(tiers)):
            out[key] = items
    for key in ("rss_above", "pss_above"):
        if getattr(r, key):
            out[key] = parse_threshold(getattr(r, key), key)
    return out


def _covers(early: dict[str, object], late: dict[str, object]) -> bool:
    """Whether every process `late` matches is matched by `early` too (checked conservatively)."""
    for key, want in early.items():
        have = late.get(key)
        if have is None:
            return False
        if key in ("rss_above", "pss_above"):
            if want == have:
                continue
            if want.size is None or have.size is None or want.size > have.size:
                return False
        elif not have <= want:     # late's alternatives are a subset of early's
            return False
    return True


def _shadowed(rules: tuple["RuleConfig", ...], tiers: tuple[str, ...] = ()) -> list[str]:
    warnings = []
    conds = [_conditions(r, tiers) for r in rules]
    for i in range(len(rules)):
        for j in range(i):
            if _covers(conds[j], conds[i]):
                what = "matches every process" if not conds[j] else "matches every process this one does"
                warnings.append(f"policy.rules[{i}]: can never match: policy.rules[{j}] before it {what}; "
                                "move it up or remove it")
                break
    return warnings


def _literal_prefix(glob: str) -> str:
    return re.split(r"[*?\[]", glob, maxsplit=1)[0]


def _shadowed_tiers(entries: tuple[tuple[str, str], ...]) -> list[str]:
    """cgroup_tiers entries an earlier glob takes every cgroup of (first glob wins), checked
    conservatively: an earlier "PREFIX*" takes every cgroup that starts with PREFIX, and every
    cgroup a later glob matches starts with the later glob's literal prefix."""
    warnings = []
    for i, (glob, _) in enumerate(entries):
        for early, _ in entries[:i]:
            head = early[:-1]
            if early.endswith("*") and head == _literal_prefix(head) and _literal_prefix(glob).startswith(head):
                warnings.append(f"{_tier_path(glob)}: never applies: {_tier_path(early)} before it takes every "
                                "cgroup it matches (the first glob wins); move it up or remove it")
                break
    return warnings


def _overriding(cfg: "PolicyConfig") -> list[str]:
    """A rule with a tier and no condition, next to cgroup_tiers: most likely meant as
    `in_tier` (match the processes of that tier), while it puts every process it reaches in it."""
    if not cfg.cgroup_tiers:
        return []
    return [f"policy.rules[{i}]: has no condition, so it matches every process that reaches it and puts it in "
            f"tier {r.tier!r} whatever policy.cgroup_tiers says; to match the processes policy.cgroup_tiers "
            f'puts in that tier, write in_tier = "{r.tier}"'
            for i, r in enumerate(cfg.rules) if r.tier and not _conditions(r, cfg.tiers)]
