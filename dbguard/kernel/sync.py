"""What to write to the BPF maps to match the sidecar's policy. Pure: no I/O.

Maps are diffed, never rewritten: only new, changed and gone entries are touched.

One map (procs) holds protected processes and kill candidates. Protected entries the
kernel added at fork (flag INHERITED) belong to the kernel: a sync leaves them while their
process lives and the ancestor they were inherited from (their `origin`) is still
protected, whether or not the caller lists them. The caller therefore need not know about
children at all; the exit hook removes them when they die. An entry the kernel made for
the child of a shielded process that is not a database (FRESH: spared until judged) is
the caller's as soon as its process is in the caller's snapshot (`judged`).

Entries the sidecar writes carry their process's start time (`starts`), so that one written
for a process that has exited since the snapshot never applies to the pid's next holder.

CANCEL (a PostgreSQL client backend the kernel may cancel) is the caller's word of this sync
alone: set only on a protected entry with a start time, dropped when the caller stops listing it.
"""
from __future__ import annotations

from typing import Callable, Collection, NamedTuple

from .layout import CANCEL, CANDIDATE, FRESH, INHERIT, INHERITED, SHIELD

PROTECTION = SHIELD | INHERIT


class ProcEntry(NamedTuple):
    flags: int
    tier: int
    cand_tier: int
    origin: int
    score: int | None     # None: read it from /proc when writing
    start: int = 0        # /proc/PID/stat start time; 0: a kernel-made entry (or not known)


class Diff(NamedTuple):
    updates: dict
    deletes: list


def _protection(tgid: int, cur: ProcEntry | None, protected: dict[int, tuple[int, int]],
                alive: Callable[[int], bool]) -> tuple[int, int, int]:
    """(flags, tier, origin) of the protected part of an entry; flags 0: not protected."""
    inherited = cur.flags & INHERITED if cur else 0
    if tgid in protected:
        flags, tier = protected[tgid]
        flags &= PROTECTION
        if flags:
            return flags | inherited, tier, cur.origin if inherited else tgid
    if inherited and cur.origin in protected and alive(tgid):
        return cur.flags & (PROTECTION | INHERITED), cur.tier, cur.origin
    return 0, 0, tgid


def diff_procs(current: dict[int, ProcEntry], protected: dict[int, tuple[int, int]],
               candidates: dict[int, int], alive: Callable[[int], bool],
               starts: dict[int, int] | None = None, judged: Collection[int] = (),
               cancel: Collection[int] = frozenset()) -> Diff:
    updates: dict[int, ProcEntry] = {}
    deletes: list[int] = []
    starts = starts or {}
    for tgid in set(current) | set(protected) | set(candidates):
        cur = current.get(tgid)
        # A fresh child the caller has now judged is the caller's: its verdict alone counts.
        mine = None if cur is not None and cur.flags & FRESH and tgid in judged else cur
        flags, tier, origin = _protection(tgid, mine, protected, alive)
        if mine is not None and mine.flags & FRESH and not flags & PROTECTION and alive(tgid):
            flags, tier, origin = mine.flags & (FRESH | INHERITED), mine.tier, mine.origin
        cand_tier = 0
        if tgid in candidates:
            flags |= CANDIDATE
            cand_tier = int(candidates[tgid])
        if not flags:
            if cur is not None:
                deletes.append(tgid)
            continue
        if flags & CANDIDATE:
            flags &= ~FRESH
        start = starts.get(tgid, cur.start if cur else 0)
        # The cancel goes only to a process the caller lists now, shielded, and named by its start.
        if tgid in cancel and tgid in protected and flags & SHIELD and start:
            flags |= CANCEL
        want = ProcEntry(flags, tier, cand_tier, origin, cur.score if cur else None, start)
        if want != cur:
            updates[tgid] = want
    return Diff(updates, sorted(deletes))


def diff_plain(current: dict, wanted: dict) -> Diff:
    """Maps whose entries belong to the sidecar alone (cgroup policies)."""
    updates = {k: v for k, v in wanted.items() if current.get(k) != v}
    deletes = [k for k in current if k not in wanted]
    return Diff(updates, deletes)


def listed_victims(held: dict[int, tuple[str, int]], slots: int) -> list[int]:
    """Which candidates fill the kernel's listed-victim slots: held is tgid -> (its scope, bytes
    held). The kernel takes a stuck task's victim from its own scope only, so every scope gets
    its largest first, then each its second, and so on, larger before smaller in each round."""
    by_scope: dict[str, list[int]] = {}
    for tgid in sorted(held, key=lambda t: (-held[t][1], t)):
        by_scope.setdefault(held[tgid][0], []).append(tgid)
    out: list[int] = []
    rank = 0
    while len(out) < slots and any(rank < len(v) for v in by_scope.values()):
        row = [v[rank] for v in by_scope.values() if rank < len(v)]
        out += sorted(row, key=lambda t: (-held[t][1], t))
        rank += 1
    return out[:slots]
