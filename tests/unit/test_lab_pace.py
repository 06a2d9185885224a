"""lab/pace.py: the lab's waits stretched by the slowdown the test VM measures (pure logic)."""
from __future__ import annotations

import subprocess
import sys

from lab import pace
from lab.launcher import REPO


def test_bound_stretches_by_the_measured_slowdown(monkeypatch):
    monkeypatch.setenv(pace.ENV, "6.5")
    assert pace.bound(60) == 390


def test_the_stretch_is_capped_so_a_failing_wait_ends_within_the_vm_job(monkeypatch):
    monkeypatch.setenv(pace.ENV, "26.6")
    assert pace.bound(60) == 60 * pace.MAX_STRETCH


def test_no_slowdown_and_a_faster_machine_leave_bounds_as_written(monkeypatch):
    monkeypatch.delenv(pace.ENV, raising=False)
    assert pace.bound(60) == 60
    monkeypatch.setenv(pace.ENV, "0.4")
    assert pace.bound(60) == 60
    monkeypatch.setenv(pace.ENV, "")         # the guest's measurement failed: no stretch, no crash
    assert pace.bound(60) == 60


def test_the_command_prints_the_ratio_the_vm_job_exports():
    took = pace.work_seconds()
    out = subprocess.run([sys.executable, "-m", "lab.pace", "--against", f"{took:.6f}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert float(out) > 0
