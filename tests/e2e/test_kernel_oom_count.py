"""A kernel OOM kill in the watched cgroup is on dbguard's audit log from the kernel's own
count (memory.events on cgroup v2, memory.oom_control on v1), with the BPF path and dbguard's
own kills off so that only the kernel acts. Runs here (v1) and in the test VM (v2, tests/vm)."""
from __future__ import annotations

import signal
import subprocess

import pytest

from dbguard.errors import DbguardError
from lab import hog
from lab.launcher import DbguardRun, base_config

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024


def test_kernel_oom_kills_are_counted_in_the_audit_from_the_cgroups_own_counter(tmp_path, make_cgroup, procs):
    cg = make_cgroup(100 * MiB)
    cfg = base_config(tmp_path, cg.path)
    cfg["general"]["interval"] = 0.2
    # Nothing listens on port 1: no database, nothing but the cgroup to watch.
    cfg["databases"] = [{"name": "gone", "kind": "postgresql",
                         "dsn": "host=127.0.0.1 port=1 dbname=postgres user=postgres", "connect_timeout": 0.5}]
    cfg["bpf"] = {"enabled": False}
    cfg["kill"] = {"enabled": False}
    with DbguardRun(tmp_path, cfg) as run:
        try:
            run.wait_protecting(timeout=120, settle=1.0)
            h = procs.add(hog.spawn(300 * MiB, 8 * MiB, 0, 30, preexec_fn=cg.preexec(), stdout=subprocess.DEVNULL))
            assert h.wait(120) == -signal.SIGKILL, f"the hog ended with {h.returncode}"
            kills = cg.oom_kills()          # the oracle: the kernel's counter, read by the test
            assert kills >= 1, "the hog died, but not by the kernel's OOM killer"
            rec = run.wait_record(lambda r: r.get("action") == "kernel_oom_count" and r.get("oom_kill") == kills,
                                  30, f"a kernel_oom_count record reaching oom_kill {kills}")
        except DbguardError as e:
            pytest.fail(str(e), pytrace=False)
        assert rec["target"] == str(cg.path) and rec["path"] == "kernel", rec
        assert rec["reason"].startswith("memory.events oom_kill " if cg.version == 2 else "memory.oom_control oom_kill ")
        if cg.version == 2:
            assert rec["oom"] >= kills, rec
        assert run.running(), run.tail(3)
    assert not [r for r in run.audit() if r.get("action") == "kill"], "dbguard killed with kills off"
