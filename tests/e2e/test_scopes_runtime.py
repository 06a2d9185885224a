"""Pods that come and go while dbguard runs: a scope appears, another vanishes.

Three PostgreSQL pods are configured (lab/pod.py, each with its own memory cgroup, named in
namespace_of), but when `dbguard run` starts only A and C are up: B's cgroup does not exist
yet, so B's server cannot be found and is answered in the host's scope. Then B's pod starts
in a new cgroup: dbguard must watch that cgroup as B's own scope (its memcg id in the BPF
scope set, bpftool's reading; B's pressure answered in B: its work_mem shrunk and its hog
killed, by records carrying B's scope) and drop the host's, which no database needs any more,
putting back the scores it raised there (this test's own process among them).
Then A's pod stops and its cgroup is removed, as a deleted pod's is: A's scope is dropped
(its id gone from the BPF set; no record for A's scope afterwards, and not a line a cycle in
dbguard's output about it), while C's pressure is still answered in C. Nothing is killed by
the kernel's OOM killer anywhere; dbguard runs on.
"""
from __future__ import annotations

import os
import re
import time

import pytest

from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun, audit_names, base_config
from lab.pod import PodPostgres
from lab.procs import oom_score_adj
from lab.scopes import bpf_scope_ids, press, settle, shut_down

MiB = 1024**2
LIMIT = 400 * MiB

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root, pytest.mark.bpf]


def answered_in(phase: list[dict], scope: str, db: str, hogs: list) -> str:
    """Why the phase's answers are not all in `scope` ("" when they are): db's cache shrunk
    and one of the hogs killed, each record carrying `scope`."""
    text = "\n".join(str(r) for r in phase)
    shrinks = [r for r in phase if r.get("action") == "shrink_cache" and r.get("database") == db]
    kills = [r for r in phase if r.get("action") == "kill" and any(audit_names(r, h.pid) for h in hogs)]
    if not shrinks or not kills:
        return f"{db}: shrinks {len(shrinks)}, hog kills {len(kills)}\n{text}"
    wrong = [r for r in shrinks + kills if r.get("scope") != scope]
    return f"answered outside {scope}: {wrong}\n{text}" if wrong else ""


def test_a_pod_started_later_gets_its_scope_and_a_deleted_one_is_dropped(tmp_path, make_cgroup, procs,
                                                                          postgresql_host):
    cg_a, cg_c = make_cgroup(LIMIT), make_cgroup(LIMIT)
    cg_b = MemoryCgroup(LIMIT)            # its path now; made when its pod starts
    pods: dict[str, PodPostgres] = {}
    daemon = None
    try:
        pods["a"], pods["c"] = PodPostgres(cg_a).__enter__(), PodPostgres(cg_c).__enter__()
        cfg = base_config(tmp_path)
        cfg["general"].update(interval=0.2, discover=False)
        cfg["bpf"] = {"enabled": True}        # the scope set is under test: no load, no test
        cfg["databases"] = [{"kind": "postgresql", "name": f"pod-{x}", "dsn": pods["a"].dsn,
                             "namespace_of": str(cg.path)} for x, cg in (("a", cg_a), ("b", cg_b), ("c", cg_c))]
        own_score = oom_score_adj(os.getpid())
        daemon = DbguardRun(tmp_path, cfg)
        daemon.wait_protecting(settle=2)
        ids = {x: os.stat(cg.path).st_ino for x, cg in (("a", cg_a), ("c", cg_c))}
        scope_a, scope_b, scope_c = str(cg_a.path), str(cg_b.path), str(cg_c.path)

        # 1. B's pod starts, in a cgroup that did not exist when dbguard started.
        cg_b.__enter__()
        pods["b"] = PodPostgres(cg_b).__enter__()
        ids["b"] = os.stat(cg_b.path).st_ino
        daemon.wait_for(lambda: bpf_scope_ids(daemon.pid) == set(ids.values()), 30,
                        f"the BPF scope set to be A, B and C ({ids})")
        # The host's scope, dropped, raised no score for good: this test's own process among them.
        daemon.wait_for(lambda: oom_score_adj(os.getpid()) == own_score, 10, "the host scope's raised scores put back")
        hogs_b, began_b = press(daemon, cg_b, procs, "pod-b")
        settle(daemon, hogs_b, scope_b)
        phase_b = daemon.audit(since=began_b)

        # 2. A's pod stops and its cgroup goes, as a deleted pod's does.
        pods.pop("a").destroy()
        cg_a.remove()
        gone_at = time.time()
        daemon.wait_for(lambda: bpf_scope_ids(daemon.pid) == {ids["b"], ids["c"]}, 30,
                        "A's id out of the BPF scope set")
        out_before = len(daemon.output(limit=10**7).splitlines())
        hogs_c, began_c = press(daemon, cg_c, procs, "pod-c")
        settle(daemon, hogs_c, scope_c)
        phase_c = daemon.audit(since=began_c)
        after_gone = daemon.audit(since=gone_at)
        lines = daemon.output(limit=10**7).splitlines()[out_before:]
        seconds = time.time() - gone_at
        assert daemon.running(), daemon.tail(5)
        assert all(p.psql("SELECT 1") == "1" for p in pods.values()), "B and C answer"
        oom_kills = {x: cg.oom_kills() for x, cg in (("b", cg_b), ("c", cg_c))}
    finally:
        shut_down(daemon, pods.values())
        cg_b.remove()

    start = next(r for r in daemon.audit() if r.get("action") == "start")
    print(f"\nstart: {start['reason']}\nafter A was deleted ({seconds:.0f} s), dbguard said:")
    print("\n".join(f"  {ln}" for ln in lines[:20]))
    assert "host memory" in start["reason"] and scope_b not in start["reason"], start  # B not found at start
    put_back = [r for r in daemon.audit() if r.get("action") == "set_oom_score_adj"
                and "scope no longer watched" in r.get("reason", "")]
    assert put_back, "no score put back when the host's scope was dropped"
    assert not (why := answered_in(phase_b, scope_b, "pod-b", hogs_b)), why
    assert not (why := answered_in(phase_c, scope_c, "pod-c", hogs_c)), why
    stale = [r for r in after_gone if r.get("scope") == scope_a]
    assert stale == [], f"records for A's scope after it was deleted: {stale}"
    about_a = [ln for ln in lines if re.search(rf"pod-a|{re.escape(scope_a)}", ln)]
    assert len(about_a) <= 3, f"{len(about_a)} lines about A in {seconds:.0f} s (a line a cycle?): {about_a[:10]}"
    assert oom_kills == {"b": 0, "c": 0}, f"the kernel OOM killer struck: {oom_kills}"
