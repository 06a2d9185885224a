"""What to write to the BPF maps to match the sidecar's policy. Pure: no I/O.

Maps are diffed, never rewritten: only new, changed and gone entries are touched.

Protected entries the kernel added at fork (flag INHERITED) belong to the kernel: a sync
leaves them while their process lives and the ancestor they were inherited from (their
`origin`) is still protected, whether or not the caller lists them. The caller therefore
need not know about children at all; the exit hook removes them when they die.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .layout import INHERITED


class ProcEntry(NamedTuple):
    flags: int
    tier: int
    origin: int
    score: int | None     # None: read it from /proc when writing


class Diff(NamedTuple):
    updates: dict
    deletes: list


def diff_protected(current: dict[int, ProcEntry], wanted: dict[int, tuple[int, int]],
                   alive: Callable[[int], bool]) -> Diff:
    updates: dict[int, ProcEntry] = {}
    for tgid, (flags, tier) in wanted.items():
        flags &= ~INHERITED
        cur = current.get(tgid)
        if cur is None:
            updates[tgid] = ProcEntry(flags, tier, tgid, None)
            continue
        inherited = cur.flags & INHERITED
        want = ProcEntry(flags | inherited, tier, cur.origin if inherited else tgid, cur.score)
        if want != cur:
            updates[tgid] = want
    deletes = [tgid for tgid, cur in current.items()
               if tgid not in wanted
               and (not cur.flags & INHERITED or cur.origin not in wanted or not alive(tgid))]
    return Diff(updates, deletes)


def diff_plain(current: dict, wanted: dict) -> Diff:
    """Maps whose entries belong to the sidecar alone (candidates, cgroup policies)."""
    updates = {k: v for k, v in wanted.items() if current.get(k) != v}
    deletes = [k for k in current if k not in wanted]
    return Diff(updates, deletes)
