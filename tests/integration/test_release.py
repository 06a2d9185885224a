"""act.process.release on real processes (no memory pressure): it reaps only a dying process,
and only the one the start time names. The release of a BPF-killed victim's memory is
tests/e2e/test_bpf.py::test_a_bpf_killed_victim_that_cannot_exit_has_its_memory_released."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbguard.act import process
from dbguard.model import ProcKey
from lab.procs import start_time

pytestmark = [pytest.mark.root]


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def test_a_live_process_is_not_reaped(sleeper):
    assert process.release(ProcKey(sleeper.pid, start_time(sleeper.pid))) == (False, "it was not dying")
    assert sleeper.poll() is None


def test_a_reused_pid_is_never_touched(sleeper):
    assert process.release(ProcKey(sleeper.pid, start_time(sleeper.pid) + 1)) == \
        (False, "the pid now belongs to another process")


def test_an_exited_process_is_said_to_have_exited(sleeper):
    key = ProcKey(sleeper.pid, start_time(sleeper.pid))
    sleeper.kill()
    sleeper.wait()
    assert process.release(key) == (False, "it had exited")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0     # a zombie has no VmRSS line


def test_a_user_kill_releases_the_victims_memory_before_it_exits(tmp_path):
    """process.kill SIGKILLs and reaps in one step. The victim is frozen (cgroup v1 freezer: a
    SIGKILL does not thaw it), so its own exit cannot be what frees the memory: its VmRSS,
    read by the test, drops while it still exists."""
    freezer = Path("/sys/fs/cgroup/freezer")
    if not (freezer / "cgroup.procs").exists():
        pytest.fail("needs the cgroup v1 freezer at /sys/fs/cgroup/freezer (mount -t cgroup -o freezer "
                    "freezer /sys/fs/cgroup/freezer)", pytrace=False)
    ready = tmp_path / "ready"
    victim = subprocess.Popen([sys.executable, "-c",
                               "import pathlib, sys, time; b = bytearray(64 << 20); b[::4096] = b'x' * (64 << 8); "
                               "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)", str(ready)])
    frozen = freezer / f"dbguard-release-{os.getpid()}"
    frozen.mkdir()
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the victim never allocated its 64 MiB"
        (frozen / "cgroup.procs").write_text(str(victim.pid))
        (frozen / "freezer.state").write_text("FROZEN")
        while (frozen / "freezer.state").read_text().strip() != "FROZEN" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (frozen / "freezer.state").read_text().strip() == "FROZEN"
        assert _rss_kib(victim.pid) >= 64 << 10
        outcome = process.kill(ProcKey(victim.pid, start_time(victim.pid)))
        assert outcome.detail == "killed (SIGKILL via pidfd; memory released at once)"
        assert victim.poll() is None, "the victim exited: it was to stay frozen"
        assert _rss_kib(victim.pid) < 16 << 10
    finally:
        (frozen / "freezer.state").write_text("THAWED")
        victim.wait(timeout=20)
        frozen.rmdir()
    assert victim.returncode == -9
