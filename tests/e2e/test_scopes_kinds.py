"""Two scopes of different kinds pressed at once: PostgreSQL and MariaDB, each in its own pod.

PostgreSQL (work_mem 64MB, the DBA's) in a 400 MiB memory cgroup and MariaDB (buffer pool
256 MiB) in a 600 MiB one, each in a pod (lab/pod.py), one `dbguard run` on the host told only
which container each is in. Hogs grow beside both at the same time: first one in each holding
its cgroup between the warn and high marks, then one in each that would pass it. Asserted from dbguard's audit
and the servers themselves: each scope's level changes carry its own cgroup's limit (400 and
600 MiB, as set here) and a usage under it; each is answered in its own scope and its own way
(PostgreSQL's work_mem shrunk, read over SQL; MariaDB's buffer pool shrunk, read over SQL;
each scope's hog killed by dbguard, path user or bpf, the record carrying that scope); no
answer for one database carries the other's scope; the kernel OOM killer never struck in
either cgroup; both servers answer with the same host pids; dbguard runs on.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from lab import hog
from lab.launcher import DbguardRun, audit_names, base_config
from lab.pod import start_pod
from lab.procs import wait_until
from lab.scopes import shut_down, warn_hog

MiB = 1024**2
LIMITS = {"postgresql": 400 * MiB, "mariadb": 600 * MiB}
NAMES = {"postgresql": "pod-pg", "mariadb": "pod-my"}
POOL = 256 * MiB
WORK_MEM = "64MB"

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


def cache_size(kind: str, pod) -> str:
    """What the server says its cache setting is now: work_mem, or the buffer pool's bytes."""
    if kind == "postgresql":
        return pod.psql("SHOW work_mem")
    return str(pod.sql("SELECT @@GLOBAL.innodb_buffer_pool_size")[0][0])


def test_postgresql_and_mariadb_pressed_at_once_each_answered_in_its_own_scope(tmp_path, make_cgroup, procs,
                                                                                 postgresql_host, mariadb_host):
    cgs = {k: make_cgroup(limit) for k, limit in LIMITS.items()}
    pods, entries, daemon = {}, [], None
    try:
        for kind, cg in cgs.items():
            work = tmp_path / kind
            work.mkdir()
            pods[kind], entry = start_pod(kind, cg, work, {"innodb_buffer_pool_size": "256M"}
                                          if kind == "mariadb" else None)
            entries.append(entry)
        pg = pods["postgresql"]
        pg.psql(f"ALTER SYSTEM SET work_mem = '{WORK_MEM}'")
        pg.psql("SELECT pg_reload_conf()")
        assert wait_until(lambda: cache_size("postgresql", pg) == WORK_MEM, 10)
        before = {k: cache_size(k, p) for k, p in pods.items()}
        assert before["mariadb"] == str(POOL), before
        servers = {k: p.host_pid for k, p in pods.items()}
        cfg = base_config(tmp_path)
        cfg["general"].update(interval=0.2, discover=False)
        entries[1].update(buffer_pool_floor="64MiB", shrink_steps=3)
        cfg["databases"] = entries
        daemon = DbguardRun(tmp_path, cfg)
        daemon.wait_protecting(settle=2)
        began = time.time()

        # Both pressed at once: a steady hog each (caches answered), then a big one each (kills).
        steady = {k: procs.add(hog.spawn(warn_hog(cg), 8 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                         stdout=subprocess.DEVNULL)) for k, cg in cgs.items()}
        shrunk = {}
        for kind, name in NAMES.items():
            daemon.wait_record(lambda r, name=name: r.get("action") == "shrink_cache" and r.get("database") == name,
                               90, f"{name}'s cache shrunk")
            # read until the server says so (a buffer pool resize, a reload, take a moment)
            wait_until(lambda kind=kind: cache_size(kind, pods[kind]) != before[kind], 30)
            shrunk[kind] = cache_size(kind, pods[kind])
        big = {k: procs.add(hog.spawn(2 * cg.limit_bytes, 10 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                      stdout=subprocess.DEVNULL)) for k, cg in cgs.items()}
        for kind, h in big.items():
            assert wait_until(lambda h=h: h.poll() is not None, 60), \
                f"the big hog beside {kind} was never killed: {daemon.audit()[-5:]}"
        for h in (*steady.values(), *big.values()):
            if h.poll() is None:
                h.kill()
                h.wait(10)
        assert all(wait_until(lambda p=p: p.host_pid and _answers(p), 30) for p in pods.values()), "both answer"
        assert {k: p.host_pid for k, p in pods.items()} == servers, "the same servers"
        assert daemon.running(), daemon.tail(5)
        audit = daemon.audit(since=began)
        oom_kills = {k: cg.oom_kills() for k, cg in cgs.items()}
    finally:
        shut_down(daemon, pods.values())

    text = "\n".join(str(r) for r in audit if r.get("action") != "set_oom_score_adj")
    print(f"\nbefore {before}, shrunk {shrunk}")
    for r in audit:
        if r.get("action") in ("level_change", "shrink_cache", "kill"):
            print(f"  {r.get('scope', '-')[-24:]:<24} {r['action']} path={r.get('path')} {r.get('target')}: "
                  f"{r.get('result')} (limit {r.get('limit_bytes')})")
    assert oom_kills == {"postgresql": 0, "mariadb": 0}, f"the kernel OOM killer struck: {oom_kills}\n{text}"
    for kind, cg in cgs.items():
        scope, name, other = str(cg.path), NAMES[kind], [NAMES[k] for k in NAMES if k != kind][0]
        levels = [r for r in audit if r.get("action") == "level_change" and r.get("scope") == scope]
        assert levels, f"no level change in {kind}'s scope\n{text}"
        assert all(r["limit_bytes"] == cg.limit_bytes and r["usage_bytes"] <= cg.limit_bytes for r in levels), \
            f"{kind}'s level not judged from its own cgroup ({cg.limit_bytes} bytes): {levels}"
        shrinks = [r for r in audit if r.get("action") == "shrink_cache" and r.get("database") == name]
        assert shrinks and all(r.get("scope") == scope and r.get("ok") for r in shrinks), text
        assert not [r for r in audit if r.get("database") == other and r.get("scope") == scope], text
        kills = [r for r in audit if r.get("action") == "kill"
                 and any(audit_names(r, h.pid) for h in (steady[kind], big[kind]))]
        assert kills and all(r.get("path") in ("user", "bpf") and r.get("scope") == scope for r in kills), text
    assert shrunk["postgresql"] != WORK_MEM, shrunk
    assert int(shrunk["mariadb"]) < POOL, shrunk


def _answers(pod) -> bool:
    try:
        return pod.psql("SELECT 1") == "1" if hasattr(pod, "psql") else pod.sql("SELECT 1") == [(1,)]
    except Exception:
        return False
