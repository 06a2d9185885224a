"""One dbguard, two databases in two pods on one node, each pod with its own memory limit.

Two PostgreSQL servers each run in a pod (lab/pod.py: `unshare --mount --pid --fork`, data
directory, socket and pid file under /srv/db, seen only inside the pod; each server is its
pod's pid 1) inside a memory cgroup of its own with its own limit, as a Kubernetes node runs
database pods. One `dbguard run` on the host is told only which container each is in
(namespace_of) and the socket path as the pod sees it; no [pressure] cgroup: it must find
both scopes itself and watch each.

Then hogs grow beside ONE of them (pod A): dbguard answers inside A (A's work_mem shrunk,
A's hogs killed, by its own audit records, path user or bpf, carrying A's scope) while B is
untouched (its work_mem as the DBA set it, read over SQL; no record of any kind for B's
scope, database or processes). Then the same in B, answered in B. Both servers survive with
the same host pids, the kernel OOM killer never struck in either cgroup, dbguard runs on.
"""
from __future__ import annotations

import pytest

from lab.launcher import DbguardRun, audit_names, base_config
from lab.pod import PodPostgres
from lab.procs import wait_until
from lab.scopes import ANSWERS, press, pressure_answer, settle, shut_down

MiB = 1024**2
LIMIT = 400 * MiB
WORK_MEM = "64MB"           # the DBA's setting in both pods (ALTER SYSTEM: dbguard shrinks it the same way)

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


def work_mem(pod: PodPostgres) -> str:
    return pod.psql("SHOW work_mem")


def answers(pod: PodPostgres) -> bool:
    try:
        return pod.psql("SELECT 1") == "1"
    except Exception:
        return False


def test_two_pods_each_answered_in_its_own_scope(tmp_path, make_cgroup, procs, postgresql_host):
    cg_a, cg_b = make_cgroup(LIMIT), make_cgroup(LIMIT)
    pods: list[PodPostgres] = []
    daemon = None
    try:
        for cg in (cg_a, cg_b):
            pods.append(PodPostgres(cg).__enter__())
        a, b = pods
        for pod in pods:
            pod.psql(f"ALTER SYSTEM SET work_mem = '{WORK_MEM}'")
            pod.psql("SELECT pg_reload_conf()")
            assert wait_until(lambda pod=pod: work_mem(pod) == WORK_MEM, 10)
        servers = (a.host_pid, b.host_pid)
        cfg = base_config(tmp_path)
        cfg["general"].update(interval=0.2, discover=False)
        cfg["databases"] = [
            {"kind": "postgresql", "name": "pod-a", "dsn": a.dsn, "namespace_of": str(cg_a.path)},
            {"kind": "postgresql", "name": "pod-b", "dsn": b.dsn, "namespace_of": str(cg_b.path)}]
        daemon = DbguardRun(tmp_path, cfg)
        daemon.wait_protecting(settle=2)
        start = next(r for r in daemon.audit() if r.get("action") == "start")
        assert "watching 2 scopes: " in start["reason"], start
        assert f"{cg_a.path} (" in start["reason"] and f"{cg_b.path} (" in start["reason"], start
        scope_a, scope_b = str(cg_a.path), str(cg_b.path)

        # 1. Pressure in A only.
        hogs_a, began_a = press(daemon, cg_a, procs, "pod-a")
        assert work_mem(b) == WORK_MEM, "B's work_mem is as the DBA set it"
        assert work_mem(a) != WORK_MEM, "A's work_mem was shrunk"
        settle(daemon, hogs_a, scope_a)
        phase_a = daemon.audit(since=began_a)

        # 2. Pressure in B only.
        hogs_b, began_b = press(daemon, cg_b, procs, "pod-b")
        assert work_mem(b) != WORK_MEM, "B's work_mem was shrunk"
        settle(daemon, hogs_b, scope_b)
        phase_b = daemon.audit(since=began_b)
        phase_a = [r for r in phase_a if float(r["ts"]) < began_b]

        assert all(answers(pod) for pod in pods), "both servers answer"
        assert (a.host_pid, b.host_pid) == servers, "the same servers"
        assert daemon.running(), daemon.tail(5)
        oom_kills = (cg_a.oom_kills(), cg_b.oom_kills())
    finally:
        shut_down(daemon, pods)

    for phase, pressed, hogs, db, other, other_db in ((phase_a, scope_a, hogs_a, "pod-a", scope_b, "pod-b"),
                                                      (phase_b, scope_b, hogs_b, "pod-b", scope_a, "pod-a")):
        text = "\n".join(str(r) for r in phase)
        print(f"\npressure in {db}:")
        for r in phase:
            if r.get("action") in ANSWERS:
                print(f"  {r.get('scope', '-')[-24:]:<24} {r['action']} path={r.get('path')} {r.get('target')}: "
                      f"{r.get('result')}")
        kills = [r for r in phase if r.get("action") == "kill" and r.get("ok", True)
                 and any(audit_names(r, h.pid) for h in hogs)]
        assert kills, f"no kill of {db}'s hogs\n{text}"
        assert all(r.get("path") in ("user", "bpf") and r.get("scope") == pressed for r in kills), text
        shrinks = [r for r in phase if r.get("action") == "shrink_cache"]
        assert shrinks and all(r["database"] == db and r["scope"] == pressed and r["ok"] for r in shrinks), text
        # The other scope, at rest: not one answer there (phase 2: A's work_mem growing back
        # after its own pressure is not an answer to B's).
        touched = [r for r in phase if pressure_answer(r) and (r.get("scope") == other or r.get("database") == other_db)]
        assert touched == [], f"{other_db} was answered for {db}'s pressure\n{text}"
    assert oom_kills == (0, 0), f"the kernel OOM killer struck: {oom_kills}"
