"""New processes are scored at birth, and the kernel's limit events wake the loop.

`dbguard run` with BPF, watching a memory cgroup, polling only every 60 s: a process started
in the cgroup has its oom_score_adj raised by the birth path (its audit record says "scored at
birth"), long before any cycle would have come. PressureMonitor alone: a cgroup that runs
out wakes wait() through the kernel's limit notifier (v1 memory.oom_control), with no PSI
trigger and no usage threshold set.

Needs root, BPF and memory cgroups; fails with the reason otherwise.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dbguard.sense.pressure import PressureMonitor
from lab.cgroup import MemoryCgroup
from lab.hog import UNLIMITED, spawn
from lab.launcher import DbguardRun, base_config

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]

MiB = 1024**2
BOUND = 20.0         # well under the 60 s interval: a bound on waiting, not a speed assertion


def test_a_new_process_in_the_cgroup_is_scored_at_birth(procs, tmp_path):
    with MemoryCgroup(512 * MiB) as cg:
        cfg = base_config(tmp_path, cg.path)
        cfg["general"].update({"interval": 60})
        cfg["bpf"] = {"enabled": True}
        run = DbguardRun(tmp_path, cfg)
        try:
            run.wait_protecting(settle=1.0)
            newcomer = procs.start([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                                   stdin=subprocess.PIPE, preexec_fn=cg.preexec())
            outsider = procs.start([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                                   stdin=subprocess.PIPE)
            deadline = time.monotonic() + BOUND
            score = 0
            while time.monotonic() < deadline:
                score = int(open(f"/proc/{newcomer.pid}/oom_score_adj").read())
                if score > 0:
                    break
                time.sleep(0.02)
            recs = [r for r in run.audit() if r.get("action") == "set_oom_score_adj" and r.get("pid") == newcomer.pid]
            assert score == 500 and recs, f"score {score}; audit {run.audit()[-5:]}; {run.tail(5)}"
            assert "scored at birth" in recs[0]["reason"] and recs[0]["outcome"] == "done"
            assert int(open(f"/proc/{outsider.pid}/oom_score_adj").read()) == 0, "only the watched cgroup"
            assert run.running()
        finally:
            run.stop(15)


def test_the_kernels_limit_event_wakes_the_wait(procs):
    with MemoryCgroup(96 * MiB) as cg, \
            PressureMonitor(str(cg.path), trigger_stall_us=1_900_000, trigger_window_us=2_000_000) as mon:
        assert mon.limit_events == "memory.oom_control", mon.trigger_error
        hog = procs.add(spawn(UNLIMITED, 8 * MiB, 0, 600, preexec_fn=cg.preexec(), stdout=subprocess.DEVNULL))
        woke = mon.wait(BOUND)
        assert woke and "limit" in mon.fired, (woke, mon.fired)
        assert hog.wait(BOUND) == -9 and cg.oom_kills() >= 1
