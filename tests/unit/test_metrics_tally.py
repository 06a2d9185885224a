"""Processes by role for /metrics, moved only by the pids each snapshot names as changed:
always the tally of the whole snapshot (the oracle: collections.Counter of its roles)."""
from __future__ import annotations

import random
from collections import Counter

from dbguard.metrics import Metrics
from dbguard.model import MemoryReading, Role, Snapshot

MEM = MemoryReading(cgroup="", cgroup_version=0, usage_bytes=0, limit_bytes=None, psi_some_avg10=0.0,
                    psi_full_avg10=0.0)
ROLES = [Role.OTHER, Role.OTHER, Role.PG_BACKEND, Role.POSTMASTER, Role.DB_CHILD, Role.KERNEL_THREAD]


def snap(seq: int, since: int, roles: dict, changed) -> Snapshot:
    return Snapshot(ts=0.0, memory=MEM, procs={}, roles=roles, databases=(), self_pid=1, seq=seq, since=since,
                    changed=changed)


def test_the_tally_follows_the_changes_and_starts_again_on_a_gap():
    rng = random.Random(17)
    m = Metrics("")
    roles: dict[int, Role] = {}
    for seq in range(1, 200):
        new = dict(roles)
        for _ in range(rng.randrange(6)):
            pid = rng.randrange(1, 40)
            if rng.random() < 0.3:
                new.pop(pid, None)
            else:
                new[pid] = rng.choice(ROLES)
        changed = frozenset(p for p in new.keys() | roles.keys() if new.get(p) is not roles.get(p))
        since = seq - 1 if seq % 37 else 0          # now and then a snapshot that follows no other
        assert m._tally_roles(snap(seq, since, new, changed)) == Counter(new.values()) - Counter()
        roles = new
