"""sense.exiting.Exiting with real processes (no memory pressure): a victim counts while it
lives, in its own scope only, and is forgotten once a zombie or after EXITING_FOR."""
from __future__ import annotations

import time

import pytest

from dbguard.model import ProcKey
from dbguard.sense.exiting import EXITING_FOR, Exiting
from lab.procs import start_time

MiB = 1024 * 1024


def test_a_victim_counts_in_its_scope_until_it_is_a_zombie(sleeper):
    ex = Exiting()
    ex.add(ProcKey(sleeper.pid, start_time(sleeper.pid)), 100 * MiB, "/sys/fs/cgroup/memory/a")
    assert ex.bytes("/sys/fs/cgroup/memory/b") == 0
    assert ex.bytes("/sys/fs/cgroup/memory/a") == 100 * MiB
    sleeper.kill()
    deadline = time.monotonic() + 5
    while open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z" \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ex.bytes("/sys/fs/cgroup/memory/a") == 0 and not ex.victims      # exited (not yet reaped)


def test_a_reused_pid_and_a_stuck_exit_do_not_count(sleeper):
    ex = Exiting()
    ex.add(ProcKey(sleeper.pid, start_time(sleeper.pid) + 1), 100 * MiB, "")
    assert ex.bytes("") == 0
    ex.add(ProcKey(sleeper.pid, start_time(sleeper.pid)), 100 * MiB, "", now=0.0)
    assert ex.bytes("", now=EXITING_FOR) == 100 * MiB
    assert ex.bytes("", now=EXITING_FOR + 0.1) == 0
