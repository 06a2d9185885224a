"""act.process.release on real processes (no memory pressure): it reaps only a dying process,
and only the one the start time names. The release of a BPF-killed victim's memory is
tests/e2e/test_bpf.py::test_a_bpf_killed_victim_that_cannot_exit_has_its_memory_released."""
from __future__ import annotations

import subprocess

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
