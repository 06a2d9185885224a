"""The benchmarks' reclaim-to-kill tracer (benchmarks/reclaim_latency.py) against cases whose
answer is known from outside it.

Oracle: the test's own clock (time.monotonic is CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns)
around what it does, and the kernel's own cgroup files. A hog (lab.hog, growing without pause)
in a small v1 memory cgroup with the OOM killer off stops at the limit, in its charge, which
the kernel reports as `under_oom 1` in memory.oom_control: its first failing reclaim began
after the test let it go and before the test saw that (while it waits, the kernel may wake it
to retry its fault, which fails again: still the same episode). Then the test waits, and kills it: the
time from the first failing reclaim to the kill lies between (kill sent - stuck seen) and
(kill returned - let go). With two episodes (the limit raised in between: the hog's charge
succeeds, it goes on and gets stuck again), the second kill is timed from the second episode,
not the first. The kernel's own OOM killer and a BPF program's bpf_send_signal are the other
two paths, each named as such.

Needs root, BPF (BCC) and v1 memory cgroups; fails saying what is missing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Iterator

import pytest

from lab import require
from lab.cgroup import MemoryCgroup
from lab.hog import UNLIMITED, spawn

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]

MiB = 1024**2
LIMIT = 64 * MiB
BOUND = 20.0                # on waiting for the kernel, not an assertion about speed


def _tracer(**kw):
    from benchmarks.reclaim_latency import Tracer
    return Tracer(**kw)


@contextlib.contextmanager
def _cgroup(oom_killer: bool) -> Iterator[MemoryCgroup]:
    require.root("the reclaim-latency tracer's test (memory cgroups, BPF)")
    with MemoryCgroup(LIMIT) as cg:
        if cg.version != 1:
            pytest.fail("this test needs v1 memory cgroups (memory.oom_control); this host has v2", pytrace=False)
        if not oom_killer:          # off: the hog waits at the limit, in its charge
            (cg.path / "memory.oom_control").write_text("1")
        yield cg


def _hog(cg: MemoryCgroup) -> subprocess.Popen:
    return spawn(UNLIMITED, 8 * MiB, 0, 600, preexec_fn=cg.preexec(), stdout=subprocess.DEVNULL,
                 stdin=subprocess.PIPE, options=("--gate",))


def _go(p: subprocess.Popen) -> float:
    time.sleep(0.5)                        # the interpreter is up and waiting at its gate
    t = time.monotonic()
    p.stdin.write(b"go\n")
    p.stdin.flush()
    return t


def _stuck(cg: MemoryCgroup) -> float:
    """When the cgroup's charge is seen stuck at the limit (under_oom 1)."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        if "under_oom 1" in (cg.path / "memory.oom_control").read_text():
            return time.monotonic()
        time.sleep(0.001)
    pytest.fail("the hog never got stuck at the cgroup's limit")


def _past(cg: MemoryCgroup, usage: int) -> None:
    deadline = time.monotonic() + BOUND
    while cg.usage() <= usage:
        if time.monotonic() > deadline:
            pytest.fail("the hog did not grow past the old limit once it was raised")
        time.sleep(0.001)


def _killed(p: subprocess.Popen) -> float:
    try:
        assert p.wait(BOUND) == -signal.SIGKILL, p.returncode
    except subprocess.TimeoutExpired:
        pytest.fail("the hog was not killed")
    return time.monotonic()


def test_user_kill_timed_from_its_own_episode():
    with _cgroup(oom_killer=False) as cg:
        p = _hog(cg)
        try:
            with _tracer(harness=set()) as t:
                t_go = _go(p)
                _stuck(cg)
                time.sleep(0.3)
                t_raise = time.monotonic()
                cg.set_limit(LIMIT + 32 * MiB)       # its charge goes through; it grows on to the new limit
                _past(cg, LIMIT)                     # under_oom, still 1 until it woke, is the new episode's now
                t_seen = _stuck(cg)
                time.sleep(0.5)
                t_k0 = time.monotonic()
                os.kill(p.pid, signal.SIGKILL)
                t_k1 = time.monotonic()
                _killed(p)
        finally:
            p.kill()
            p.wait()
        inode = os.stat(cg.path).st_ino
    kills = t.latencies.of({p.pid}).kills
    assert len(kills) == 1, kills
    k = kills[0]
    low, high = (t_k0 - t_seen) * 1000, (t_k1 - t_raise) * 1000
    print(f"user kill: {k.ms:.3f} ms, oracle [{low:.3f}, {high:.3f}] ms; first episode began after "
          f"{(t_raise - t_go) * 1000:.0f} ms before")
    assert k.path == "user" and k.sender == os.getpid() and k.first, k
    assert k.memcg == inode, k
    assert k.ms is not None and low <= k.ms <= high, (k, low, high)


def _killed_alone(cg: MemoryCgroup, p: subprocess.Popen) -> tuple:
    """The hog let go and left to whoever kills it: (its one kill as traced, the oracle's bound
    on its latency in ms: let go -> seen dead)."""
    try:
        with _tracer() as t:
            t_go = _go(p)
            t_dead = _killed(p)
    finally:
        p.kill()
        p.wait()
    kills = t.latencies.of({p.pid}).kills
    assert len(kills) == 1, kills
    return kills[0], (t_dead - t_go) * 1000


def test_kernel_oom_kill():
    with _cgroup(oom_killer=True) as cg:
        k, high = _killed_alone(cg, _hog(cg))
        assert cg.oom_kills() == 1
    print(f"kernel OOM kill: {k.ms:.3f} ms after the first failing reclaim; oracle (0, {high:.3f}] ms")
    assert k.path == "kernel" and k.first, k
    assert k.ms is not None and 0 < k.ms <= high, (k, high)


KILLER = r"""
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    if ((bpf_get_current_pid_tgid() >> 32) == TARGET && args->nr_reclaimed == 0)
        bpf_send_signal(9);
    return 0;
}
"""


def test_bpf_kill():
    """A BPF program of the test's own kills the hog at its first failing reclaim, as
    dbguard's in-kernel path does (bpf_send_signal in a tracepoint program)."""
    from bcc import BPF
    with _cgroup(oom_killer=False) as cg:
        p = _hog(cg)
        killer = BPF(text=(f"#define TARGET {p.pid}\n" + KILLER).encode())
        try:
            k, high = _killed_alone(cg, p)
        finally:
            killer.cleanup()
    print(f"bpf kill: {k.ms:.3f} ms after the first failing reclaim; oracle (0, {high:.3f}] ms")
    assert k.path == "bpf" and k.sender == p.pid and k.first, k
    assert k.ms is not None and 0 < k.ms <= high, (k, high)
