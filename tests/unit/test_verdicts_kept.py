"""Verdicts kept across snapshots (policy/verdicts.py): worked out anew only for the processes
a snapshot names as changed, yet the same as a fresh Judge's over the whole snapshot (the
oracle), with the kill order and the kernel's share alike, as processes come, go, grow, change
role, and the level and the limit move."""
from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard import config
from dbguard.model import Level, MemoryReading, Proc, Role, Snapshot
from dbguard.policy import Policy

MiB = 1024 * 1024
CG = "/lab"
ROLES = st.sampled_from([Role.OTHER, Role.OTHER, Role.OTHER, Role.PG_BACKEND, Role.DB_CHILD, Role.KERNEL_THREAD,
                         Role.POSTMASTER])


def judge():
    cfg = config.from_dict({"databases": [{"kind": "postgresql", "name": "main", "dsn": "dbname=postgres"}],
                            "kill": {"protect_exe": ["/usr/bin/keep*"], "prefer_exe": ["/usr/bin/hog*"]},
                            # a verdict that moves with the limit alone
                            "policy": {"rules": [{"name": "quarter", "rss_above": "0.25x limit", "action": "kill"}]}})
    return Policy(cfg, watched_memcg=CG).judge


def proc(pid: int, rss_mib: int, exe: str, memcg: str) -> Proc:
    return Proc(pid=pid, start_time=pid * 10, ppid=1, uid=1000, comm="p", exe=exe, cmdline="p",
                rss_bytes=rss_mib * MiB, memcg=memcg, oom_score_adj=0)


PROC = st.builds(proc, st.integers(2, 40), st.integers(0, 400),
                 st.sampled_from(["/usr/bin/python3", "/usr/bin/keeper", "/usr/bin/hogger", ""]),
                 st.sampled_from([CG, CG + "/x", "/elsewhere"]))


@st.composite
def histories(draw):
    procs: dict[int, Proc] = {}
    roles: dict[int, Role] = {}
    steps = []
    for _ in range(draw(st.integers(2, 8))):
        procs, roles = dict(procs), dict(roles)
        for p in draw(st.lists(PROC, max_size=6)):        # born, or read again
            procs[p.pid] = p
            roles.setdefault(p.pid, draw(ROLES))
        for pid in draw(st.lists(st.sampled_from(sorted(procs)), max_size=2, unique=True)) if procs else ():
            if draw(st.booleans()):
                procs.pop(pid)
                roles.pop(pid)
            else:
                roles[pid] = draw(ROLES)
        steps.append((dict(procs), dict(roles), draw(st.sampled_from([Level.OK, Level.WARN, Level.HIGH])),
                      draw(st.sampled_from([1000 * MiB, 1000 * MiB, 500 * MiB]))))
    return steps


@settings(max_examples=300, deadline=None)
@given(histories())
def test_kept_verdicts_are_a_fresh_judges(history):
    kept = judge()
    last_procs: dict = {}
    last_roles: dict = {}
    last_judged = None
    for seq, (procs, roles, level, limit) in enumerate(history, 1):
        changed = frozenset(pid for pid in procs.keys() | last_procs.keys()
                            if procs.get(pid) is not last_procs.get(pid) or roles.get(pid) is not last_roles.get(pid))
        mem = MemoryReading(cgroup="/sys/fs/cgroup/memory/lab", cgroup_version=1, usage_bytes=0, limit_bytes=limit,
                            psi_some_avg10=0.0, psi_full_avg10=0.0)
        snap = Snapshot(ts=seq, memory=mem, procs=procs, roles=roles, databases=(), self_pid=999, seq=seq,
                        since=seq - 1, changed=changed)
        fresh = judge()
        kept.level = fresh.level = level
        assert kept.verdicts(snap) == fresh.verdicts(dataclasses.replace(snap, changed=None))
        assert [(p.pid, v) for p, v in kept.ranked(snap)] == [(p.pid, v) for p, v in fresh.ranked(snap)]
        assert kept.kernel_view(snap) == fresh.kernel_view(snap)
        if last_judged == (level, limit):       # else every verdict may move
            assert kept.changed <= changed
        last_procs, last_roles, last_judged = procs, roles, (level, limit)
