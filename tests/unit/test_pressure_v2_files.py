"""PressureMonitor on a cgroup v2 directory laid out in a temp dir (the files the kernel
shows): what it reads, and what it says when the cgroup goes away. The same paths run on a
real cgroup v2 kernel in the test VM (tests/e2e/test_pressure.py through tests/vm)."""
from __future__ import annotations

import shutil

import pytest

from dbguard.errors import DbguardError
from dbguard.sense.pressure import PressureMonitor

MiB = 1024 * 1024
PSI = "some avg10=1.50 avg60=0.00 avg300=0.00 total=10\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=5\n"


def v2_cgroup(d, current: int, limit: str) -> None:
    d.mkdir()
    for name, text in {"cgroup.controllers": "memory pids\n", "memory.current": f"{current}\n",
                       "memory.max": limit + "\n", "memory.stat": "anon 0\ninactive_file 0\n",
                       "memory.pressure": PSI}.items():
        (d / name).write_text(text)


def monitor(d) -> PressureMonitor:
    # A stall above its window: no PSI trigger is opened on the plain files.
    return PressureMonitor(str(d), trigger_stall_us=2, trigger_window_us=1)


def test_a_v2_cgroup_reads_its_own_files(tmp_path):
    cg = tmp_path / "db.service"
    v2_cgroup(cg, 300 * MiB, str(500 * MiB))
    r = monitor(cg).read()
    assert (r.cgroup_version, r.usage_bytes, r.limit_bytes) == (2, 300 * MiB, 500 * MiB)
    assert (r.psi_some_avg10, r.psi_full_avg10) == (1.5, 0.5)


def test_a_removed_v2_cgroup_reads_as_missing_not_as_the_host(tmp_path):
    # Found on the test VM's 6.1 kernel: once the directory went, its missing memory.current
    # made it look like the v2 root, and the monitor went on reading the host's memory.
    cg = tmp_path / "db.service"
    v2_cgroup(cg, 300 * MiB, "max")
    mon = monitor(cg)
    assert mon.read().usage_bytes == 300 * MiB
    shutil.rmtree(cg)
    with pytest.raises(DbguardError, match="does not exist"):
        mon.read()
