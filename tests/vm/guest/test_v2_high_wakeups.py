"""memory.high throttling as a wake-up, on a real cgroup v2 host.

A cgroup held at a memory.high in it notifies the memory.events of every ancestor on each
throttling event (the kernel rate-limits a file's notifications to one per 20 ms), so a
watched scope with a throttled sub-group would wake the loop up to 50 times a second, each
wake-up a whole cycle. The monitor tells those events ("high") from the scope reaching its
hard limit or running out ("limit"), and wait_any holds "high" alone until the pressed pace
allows the next cycle, while "limit" still ends the wait at once.

Oracle: the kernel's own counters in memory.events (high and max/oom rising during the wait).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from dbguard.sense.pressure import PressureMonitor
from dbguard.sense.wakeups import wait_any
from lab import hog, pace

MiB = 1024**2
LIMIT = 400 * MiB
HIGH = 48 * MiB
HOLD = 3.0          # the not-before time given to wait_any
# No PSI trigger (a stall longer than its window is refused): the throttled hog stalls, and its
# PSI would end every wait here; memory.events is the one source these tests are about.
NO_TRIGGER = {"trigger_stall_us": 2_000_001, "trigger_window_us": 2_000_000}


def events(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split() for ln in (path / "memory.events").read_text().splitlines())}


def _throttled(make_cgroup, procs):
    """A 400 MiB scope with a hog held at a 48 MiB memory.high in its sub-group."""
    cg = make_cgroup(LIMIT)
    (cg.path / "cgroup.subtree_control").write_text("+memory")
    (cg.child("hog").path / "memory.high").write_text(str(HIGH))
    procs.add(hog.spawn(4 * HIGH, 4 * MiB, 0, hold=600, preexec_fn=cg.preexec("hog"), stdout=subprocess.DEVNULL))
    deadline = time.monotonic() + pace.bound(30)
    while events(cg.path)["high"] < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert events(cg.path)["high"] >= 20, f"the hog was never throttled at memory.high: {events(cg.path)}"
    return cg


def test_throttling_alone_wakes_no_earlier_than_the_pace_allows(make_cgroup, procs):
    cg = _throttled(make_cgroup, procs)
    with PressureMonitor(str(cg.path), **NO_TRIGGER) as mon:
        assert mon.limit_events == "memory.events" and not mon.trigger_active, mon.trigger_error
        # Without a hold the throttling wakes the wait, and says so.
        assert "high" in wait_any([mon], pace.bound(10)), "a throttled sub-group did not wake the wait"
        before = events(cg.path)
        start = time.monotonic()
        fired = wait_any([mon], pace.bound(30), high_not_before=start + HOLD)
        waited = time.monotonic() - start
        after = events(cg.path)
    assert after["high"] - before["high"] >= 5, f"too few throttling events to hold back: {before} -> {after}"
    assert fired == {"high"} and mon.fired == {"high"}, (fired, mon.fired)
    assert waited >= HOLD, f"the wait ended {waited:.2f} s in, before the {HOLD} s not-before"
    assert all(after[k] == before[k] for k in ("max", "oom", "oom_kill")), (before, after)


def test_the_limit_reached_ends_a_held_wait_at_once(make_cgroup, procs):
    cg = _throttled(make_cgroup, procs)
    hold = pace.bound(60)
    with PressureMonitor(str(cg.path), **NO_TRIGGER) as mon:
        assert mon.limit_events == "memory.events" and not mon.trigger_active, mon.trigger_error
        before = events(cg.path)
        # A second sub-group runs into a hard limit of its own: its "max" rises in the scope too.
        (cg.child("max").path / "memory.max").write_text(str(32 * MiB))
        procs.add(hog.spawn(128 * MiB, 4 * MiB, 0, hold=600, preexec_fn=cg.preexec("max"),
                            stdout=subprocess.DEVNULL))
        start = time.monotonic()
        fired = wait_any([mon], hold, high_not_before=start + hold)
        waited = time.monotonic() - start
        after = events(cg.path)
    assert after["max"] > before["max"], f"the scope never counted its sub-group's limit: {before} -> {after}"
    assert "limit" in fired, (fired, before, after)
    assert waited < hold, "the limit's wake-up was held back like throttling"
