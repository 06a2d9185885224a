"""Databases in other namespaces under memory pressure, with `dbguard run` on the host.

PostgreSQL and MariaDB each run in a pod (lab/pod.py: `unshare --mount --pid --fork`, their
data directory, socket and pid file under /srv/db, which only the pod sees; each server is
its pod's pid 1) inside its own memory cgroup, with a hog beside it in that cgroup. dbguard
is told only which container (namespace_of) and the socket path as the pod sees it; no
[pressure] cgroup: the watched scope must come from the server it identified (its host pid's
cgroup). Asserted: the server is never a kill candidate and its score never raised, the hog
is killed by dbguard (its own audit record, path user or bpf), the kernel OOM killer never
struck in the cgroup, the server answers afterwards with the same host pid, dbguard runs on.
"""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from dbguard.errors import DbguardError
from lab import hog
from lab.launcher import DbguardRun, audit_names, base_config
from lab.pod import start_pod
from lab.procs import oom_score_adj, wait_until

MiB = 1024**2
LIMIT = 400 * MiB

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


def pod_pids(pod) -> list[int]:
    """Host pids of every process in the pod's pid namespace (read here from /proc)."""
    link = Path(f"/proc/{pod.host_pid}/ns/pid").readlink()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "ns/pid").readlink() == link:
                    out.append(int(d.name))
    return out


def answers(kind: str, pod) -> bool:
    try:
        return pod.psql("SELECT 1") == "1" if kind == "postgresql" else pod.sql("SELECT 1") == [(1,)]
    except Exception:
        return False


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_a_database_in_a_pod_survives_a_hog_beside_it(kind, tmp_path, make_cgroup, procs, postgresql_host,
                                                       mariadb_host):
    cg = make_cgroup(LIMIT)
    pod, db = start_pod(kind, cg, tmp_path)
    daemon = None
    try:
        server = pod.host_pid
        cfg = base_config(tmp_path)
        cfg["general"].update(interval=0.2, discover=False)
        cfg["databases"] = [db]
        daemon = DbguardRun(tmp_path, cfg)
        daemon.wait_protecting(settle=2)
        start = next(r for r in daemon.audit() if r.get("action") == "start")
        assert str(cg.path) in start["reason"], start     # the scope found from the server's own cgroup
        shielded = pod_pids(pod)
        h = procs.add(hog.spawn(2 * LIMIT, 10 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                stdout=subprocess.DEVNULL))
        assert wait_until(lambda: h.poll() is not None, 60), f"the hog was never killed: {daemon.audit()[-5:]}"
        assert wait_until(lambda: answers(kind, pod), 30), f"the {kind} server in the pod does not answer"
        assert daemon.running(), daemon.tail(5)
        audit = daemon.audit()
        oom_kills = cg.oom_kills()
        scores = {pid: oom_score_adj(pid) for pid in shielded}
    finally:
        if daemon is not None:
            with contextlib.suppress(DbguardError):
                daemon.stop()
        pod.destroy()
    kills = [r for r in audit if r.get("action") in ("kill", "bpf_kill")]
    print(f"\n{kind} in a pod (host pid {server}): {start['reason']}")
    for r in kills:
        print(f"  {r.get('action')} path={r.get('path', 'user')} {r.get('target')} level={r.get('level')}: "
              f"{r.get('result')}")
    text = "\n".join(str(r) for r in audit if r.get("action") != "set_oom_score_adj")
    assert oom_kills == 0, f"the kernel OOM killer struck {oom_kills} time(s)\n{text}"
    assert any(audit_names(r, h.pid) and r.get("path", "user") in ("user", "bpf") for r in kills), text
    assert not any(audit_names(r, pid) for r in audit for pid in shielded if r.get("action") != "start"), text
    assert all(v is None or v <= 0 for v in scores.values()), scores
    assert pod.host_pid == server
