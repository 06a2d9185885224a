"""The guest is what the v2 suite needs: cgroup v2 only, with the memory controller, per-cgroup
PSI and memory.events, and the kernel's OOM killer counting in them."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from lab import hog
from lab.cgroup import own_memory_cgroup

MiB = 1024 * 1024


def test_the_guest_is_a_cgroup_v2_only_host():
    mounts = [line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[2] == "cgroup"]
    assert mounts == [], "a cgroup v1 hierarchy is mounted in the guest"
    assert own_memory_cgroup() == (Path("/sys/fs/cgroup"), 2)
    assert platform.release().startswith("6.1."), platform.release()


def test_a_v2_child_counts_its_oom_kill_in_memory_events(make_cgroup, procs):
    cg = make_cgroup(64 * MiB)
    assert (cg.path / "memory.pressure").exists()
    p = procs.add(hog.spawn(200 * MiB, 8 * MiB, 0, 30, preexec_fn=cg.preexec(), stdout=subprocess.DEVNULL))
    assert p.wait(120) == -9
    assert cg.oom_kills() == 1
    assert int((cg.path / "memory.max").read_text()) == 64 * MiB
    assert os.getpid() not in cg.pids()
