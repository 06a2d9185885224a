"""The kernel decides without waiting: a task of the watched scope whose own reclaim keeps
failing is killed by the BPF program whether or not user space has listed it.

Real BPF (BpfGuard loaded with BCC), real memory pressure in memory cgroups made under our
own. The scope is always the test's cgroup (never the host: other tests share this kernel).
Who acted is asserted from two sides: the program's kill event (path "bpf") and the
cgroup's own OOM-kill counter (memory.oom_control), the kernel's oracle.

Needs root, BCC, kernel headers and BTF (`make setup`); fails with the reason otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from dbguard.kernel import layout
from dbguard.kernel.bpf import INHERIT, SHIELD, event_to_audit, exe_identity
from lab.cgroup import MemoryCgroup
from lab.hog import UNLIMITED, spawn
from lab.procs import start_time

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]

MiB = 1024**2
WAIT = 60.0          # bound on waiting for the kernel, not an assertion about speed
PY = sys.executable


@pytest.fixture
def bpf(bpf_guard):
    def reset():
        bpf_guard.set_policy(level=0, enabled=False, dry_run=False)
        bpf_guard.set_scope(None, unlisted=False)
        bpf_guard.set_exes(set())
        bpf_guard.sync_processes({}, {})
        bpf_guard.poll(0)
    reset()
    try:
        yield bpf_guard
    finally:
        reset()


def arm(bpf, *cgs: MemoryCgroup, dry_run: bool = False, births: bool = False) -> None:
    """The gate a daemon sets at level ok: the early streak, kill.min_rss of anonymous memory;
    the scope: the cgroup, or the set of them (several databases, each with its own limit)."""
    bpf.set_scopes([str(cg.path) for cg in cgs])
    bpf.set_policy(level=0, enabled=True, dry_run=dry_run, min_level_to_kill=3, fail_streak=3,
                   early_streak=8, min_anon_bytes=32 * MiB, births=births)


def hog(procs, cg: MemoryCgroup, *options: str, total: int = UNLIMITED, step: int = 8 * MiB,
        hold: float = 600) -> subprocess.Popen:
    return procs.add(spawn(total, step, 0, hold, preexec_fn=cg.preexec(), stdout=subprocess.PIPE,
                           options=options))


def events_until_exit(bpf, p: subprocess.Popen, bound: float = WAIT) -> tuple[int | None, list]:
    """Poll events until `p` exits (or the bound passes); its exit code and every event."""
    import time
    seen = []
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and p.poll() is None:
        seen += bpf.poll(50)
    seen += bpf.poll(100)
    return p.poll(), seen


def of(events, kind: str, pid: int) -> list:
    return [e for e in events if e.kind == kind and e.tgid == pid]


def test_an_unlisted_hog_of_the_scope_is_killed_in_the_kernel_before_the_oom_killer(bpf, procs):
    with MemoryCgroup(192 * MiB) as cg:
        arm(bpf, cg)
        h = hog(procs, cg)
        rc, events = events_until_exit(bpf, h)
        kills = of(events, "kill", h.pid)
        assert rc == -9, f"hog exit {rc}; events {events}"
        assert kills, f"no BPF kill of the unlisted hog; events {events}, counters {bpf.counters()}"
        ev = kills[0]
        assert ev.detail["unlisted"] and ev.detail["signal_result"] == 0 and ev.detail["fail_streak"] >= 8
        assert ev.path == "bpf" and ev.level == 0, "no level from user space was needed"
        assert cg.oom_kills() == 0, "the kernel OOM killer acted: the BPF kill came too late"
        rec = event_to_audit(ev)
        assert rec["path"] == "bpf" and "not listed yet" in rec["reason"]


def test_a_hog_outside_the_scope_is_left_to_the_kernel(bpf, procs):
    with MemoryCgroup(192 * MiB) as watched, MemoryCgroup(192 * MiB) as other:
        arm(bpf, watched)
        h = hog(procs, other)
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and other.oom_kills() >= 1, "the kernel OOM killer ended it"
        assert not of(events, "kill", h.pid) and not of(events, "would_kill", h.pid)


def test_each_scope_of_a_set_is_watched_in_the_kernel_and_no_other_cgroup(bpf, procs):
    """One node, pods A and B each with its own limit: an unlisted hog in either is killed in
    the kernel (the scopes map of memory cgroup ids), one in a third cgroup is not."""
    with MemoryCgroup(192 * MiB) as a, MemoryCgroup(192 * MiB) as b, MemoryCgroup(192 * MiB) as other:
        arm(bpf, a, b)
        assert bpf._policy.scope == layout.SCOPE_SET
        for cg in (a, b):
            h = hog(procs, cg)
            rc, events = events_until_exit(bpf, h)
            assert rc == -9 and of(events, "kill", h.pid), f"{cg.path}: exit {rc}; events {events}"
            assert of(events, "kill", h.pid)[0].detail["unlisted"]
            assert cg.oom_kills() == 0, f"{cg.path}: the kernel OOM killer acted: the BPF kill came too late"
        h = hog(procs, other)
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and other.oom_kills() >= 1, "the kernel OOM killer ended it"
        assert not of(events, "kill", h.pid) and not of(events, "would_kill", h.pid)


def test_each_scope_of_a_set_is_judged_by_its_own_level(bpf, procs):
    """Pod A at critical, pod B at ok with no kill below critical (early streak 0): the kernel
    kills A's hog, and leaves B's to the kernel's OOM killer, as B's own level says; the
    highest level of the node (the policy's) is not B's gate."""
    with MemoryCgroup(192 * MiB) as a, MemoryCgroup(192 * MiB) as b:
        bpf.set_scopes([str(a.path), str(b.path)])
        bpf.set_policy(level=3, enabled=True, dry_run=False, min_level_to_kill=3, fail_streak=3,
                       early_streak=0, min_anon_bytes=32 * MiB)
        bpf.set_scope_levels({str(a.path): 3, str(b.path): 0})
        h = hog(procs, a)
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and of(events, "kill", h.pid), f"A: exit {rc}; events {events}"
        assert of(events, "kill", h.pid)[0].level == 3 and a.oom_kills() == 0
        h = hog(procs, b)
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and b.oom_kills() >= 1, "the kernel OOM killer ended it"
        assert not of(events, "kill", h.pid) and not of(events, "would_kill", h.pid), events


def test_a_page_cache_load_sees_no_kill(bpf, procs):
    """Reclaim that succeeds is normal: the scope full of clean page cache, nobody killed."""
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="dbguard-cache-") as f:
        block = os.urandom(MiB)
        for _ in range(384):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        fd = os.open(f.name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        with MemoryCgroup(128 * MiB) as cg:
            arm(bpf, cg)
            before = bpf.counters()
            # 40 MiB of anonymous memory (above the gate's size), then the file through the cache
            reader = hog(procs, cg, "--read", f.name, "--passes", "2", total=40 * MiB, hold=0)
            rc, events = events_until_exit(bpf, reader)
            after = bpf.counters()
            assert cg.limit_hits() > 0, "the cgroup never hit its limit: the test proves nothing"
            assert rc == 0, f"the reader ended with {rc}"
            assert after["kills"] == before["kills"] and not of(events, "kill", reader.pid)


CHILDREN = r"""
import mmap, os, sys
sys.stdin.readline()
r, w = os.pipe()
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        chunks = []
        while True:                       # allocate until killed
            m = mmap.mmap(-1, 8 << 20)
            for i in range(0, 8 << 20, 4096):
                m[i] = 1
            chunks.append(m)
    pids.append(pid)
print(*pids, flush=True)
sys.stdin.readline()
os.close(w)
for pid in pids:
    os.waitpid(pid, 0)
print("reaped", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("flags", [SHIELD | INHERIT, SHIELD], ids=["database-family", "shielded"])
def test_a_protected_parents_fresh_children_are_never_killed_by_bpf(bpf, procs, flags):
    """Children born of a protected process are protected (INHERIT) or spared until user space
    judges them (FRESH): the BPF program kills neither, even as they exhaust the cgroup."""
    with MemoryCgroup(160 * MiB) as cg:
        arm(bpf, cg)
        parent = procs.start([PY, "-c", CHILDREN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             preexec_fn=cg.preexec())
        bpf.sync_processes({parent.pid: (flags, 1)}, {}, starts={parent.pid: start_time(parent.pid)})
        parent.stdin.write("go\n")
        parent.stdin.flush()
        children = [int(x) for x in parent.stdout.readline().split()]
        held = {k.value: v.flags for k, v in bpf._procs.items()}
        want = layout.FRESH if not flags & INHERIT else SHIELD
        assert all(held.get(c, 0) & want for c in children), (held, children)
        parent.stdin.write("alloc\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        events = bpf.poll(200)
        assert cg.oom_kills() >= 2, "the kernel OOM killer ended the children (the only way out left)"
        assert not [e for e in events if e.kind in ("kill", "would_kill") and e.tgid in children], events
        assert parent.poll() is None


def test_a_database_executable_is_never_killed_by_bpf(bpf, procs):
    """Known by file identity (inode and device), identified as a server or not."""
    exe = os.path.realpath(PY)
    ident = exe_identity(exe)
    with MemoryCgroup(192 * MiB) as cg:
        arm(bpf, cg)
        bpf.set_exes({ident})
        assert bpf.exes() == {ident}
        before = bpf.counters()["exe_protected"]
        h = hog(procs, cg)
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and cg.oom_kills() >= 1, "only the kernel OOM killer ended it"
        assert not of(events, "kill", h.pid)
        assert bpf.counters()["exe_protected"] > before


def test_dry_run_kills_nobody_and_says_what_it_would_do(bpf, procs):
    with MemoryCgroup(192 * MiB) as cg:
        arm(bpf, cg, dry_run=True)
        h = hog(procs, cg)
        rc, events = events_until_exit(bpf, h)
        would = of(events, "would_kill", h.pid)
        assert would and not of(events, "kill", h.pid), events
        assert event_to_audit(would[0])["result"].startswith("dry_run")
        assert cg.oom_kills() >= 1, "the kernel OOM killer, not dbguard, ended it"


def test_an_entry_for_an_earlier_holder_of_the_pid_never_applies(bpf, procs):
    """Pid reuse against the maps: a SHIELD entry written with another process's start time
    (the process the sidecar saw has exited, the pid now belongs to a hog) shields nothing;
    the sync also drops such an entry right after writing it."""
    with MemoryCgroup(192 * MiB) as cg:
        arm(bpf, cg)
        h = procs.add(spawn(UNLIMITED, 8 * MiB, 0, 600, preexec_fn=cg.preexec(), stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, options=("--gate",)))
        real = start_time(h.pid)
        earlier = real - 1
        bpf.sync_processes({h.pid: (SHIELD, 1)}, {}, starts={h.pid: earlier})
        assert h.pid not in bpf.protected_tgids(), "the sync dropped the entry: its start time is not the pid's"
        # Written behind the sync's back, as if the process had changed between the check and the use.
        bpf._procs[layout.ct.c_uint32(h.pid)] = layout.Proc(SHIELD, 1, 0, h.pid, 0, 0, earlier)
        before = bpf.counters()["stale_entries"]
        h.stdin.write(b"go\n")
        h.stdin.flush()
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and of(events, "kill", h.pid), events
        assert bpf.counters()["stale_entries"] > before
        assert cg.oom_kills() == 0


def test_an_entry_with_the_right_start_time_shields(bpf, procs):
    with MemoryCgroup(192 * MiB) as cg:
        arm(bpf, cg)
        h = procs.add(spawn(UNLIMITED, 8 * MiB, 0, 600, preexec_fn=cg.preexec(), stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, options=("--gate",)))
        bpf.sync_processes({h.pid: (SHIELD, 1)}, {}, starts={h.pid: start_time(h.pid)})
        assert h.pid in bpf.protected_tgids()
        h.stdin.write(b"go\n")
        h.stdin.flush()
        rc, events = events_until_exit(bpf, h)
        assert rc == -9 and cg.oom_kills() >= 1 and not of(events, "kill", h.pid)
        assert of(events, "breach", h.pid), "a shielded victim of the kernel is a breach"


def test_births_in_each_scope_of_a_set_are_reported_and_in_no_other_cgroup(bpf, procs):
    """The scope set's ancestor lookups (dbg_in_scope) without memory pressure: a birth in either
    scope of a set is the kernel's to report, one in a third cgroup is not."""
    with MemoryCgroup(512 * MiB) as a, MemoryCgroup(512 * MiB) as b, MemoryCgroup(512 * MiB) as other:
        arm(bpf, a, b, births=True)
        assert bpf._policy.scope == layout.SCOPE_SET
        started = {cg: procs.start([PY, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE,
                                   preexec_fn=cg.preexec()) for cg in (a, b, other)}
        import time
        births, deadline = set(), time.monotonic() + WAIT
        while time.monotonic() < deadline and not {started[a].pid, started[b].pid} <= births:
            births |= {e.pid for e in bpf.poll(100) if e.kind == "birth"}
        births |= {e.pid for e in bpf.poll(200) if e.kind == "birth"}
        assert started[a].pid in births and started[b].pid in births, births
        assert started[other].pid not in births, births

def test_births_in_the_scope_are_reported(bpf, procs):
    with MemoryCgroup(512 * MiB) as cg:
        arm(bpf, cg, births=True)
        p = procs.start([PY, "-c", "import os, sys; pid = os.fork(); pid or os._exit(0); "
                         "print(pid, flush=True); os.waitpid(pid, 0); sys.stdin.readline()"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=cg.preexec())
        child = int(p.stdout.readline())
        events = bpf.poll(200)
        births = {(e.pid, e.detail["exec"]) for e in events if e.kind == "birth"}
        assert (p.pid, True) in births, events          # moved in, then exec'd: seen at exec
        assert (child, False) in births, events         # forked in the scope
        outside = procs.start([PY, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
        assert not [e for e in bpf.poll(200) if e.kind == "birth" and e.pid == outside.pid]
