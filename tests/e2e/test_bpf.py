"""The in-kernel policy on the real kernel: fork inheritance, reclaim-time kills, OOM audit.

Needs root, BCC and kernel headers (`make setup`); without them every test here FAILS with
the reason and the fix, it never skips. Memory pressure only inside lab.cgroup.MemoryCgroup.
"""
from __future__ import annotations

import ctypes as ct
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dbguard.kernel import layout
from dbguard.kernel.bpf import (INHERIT, INHERITED, SHIELD, BpfGuard, event_to_audit,
                                program_source, protections)
from dbguard import config
from dbguard.audit import AuditLog
from dbguard.daemon import Daemon
from dbguard.kernel.feed import KernelFeed
from dbguard.metrics import Metrics
from dbguard.kernel.maps import map_info
from lab import pace
from lab.cgroup import MemoryCgroup
from lab.hog import UNLIMITED, spawn, wait_holding
from lab.procs import start_time

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]

MiB = 1024**2
WAIT = pace.bound(60.0)     # bound on waiting for the kernel, not an assertion about speed
PY = sys.executable


@pytest.fixture
def bpf(bpf_guard):
    """The module's guard, with policy and maps reset around each test."""
    def reset():
        bpf_guard.set_policy(level=0, enabled=False, dry_run=False)
        bpf_guard.set_scope(None, unlisted=False)     # never the host: other tests share this kernel
        bpf_guard.set_exes(set())
        bpf_guard.sync_processes({}, {})
        bpf_guard.sync_cgroups({})
        bpf_guard.set_listed_victims([])
        bpf_guard.poll(0)
    reset()
    try:
        yield bpf_guard
    finally:
        reset()


def run_code(procs, code: str, *args: str, cg: MemoryCgroup | None = None) -> subprocess.Popen:
    """A test process running `code` (stdin and stdout piped, text), reaped by `procs`."""
    return procs.start([PY, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                       preexec_fn=cg.preexec() if cg else None)


def start_hog(procs, cg: MemoryCgroup, *options: str, total: int = UNLIMITED, step: int = 8 * MiB,
              hold: float = 600, gate: bool = True) -> subprocess.Popen:
    """lab.hog in `cg`; by default it waits for a line on stdin (go()), then takes fresh
    anonymous memory in 8 MiB steps, touching every page, until it is killed."""
    return procs.add(spawn(total, step, 0, hold, preexec_fn=cg.preexec(), stdout=subprocess.PIPE,
                           stdin=subprocess.PIPE, options=(("--gate",) if gate else ()) + options))


def go(p: subprocess.Popen) -> None:
    p.stdin.write(b"go\n")
    p.stdin.flush()


def wait_events(g: BpfGuard, want, bound: float = WAIT) -> list:
    """Poll until want(events) is true or the bound passes; returns every event seen."""
    seen = []
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        seen += g.poll(100)
        if want(seen):
            break
    return seen


def wait_exit(p: subprocess.Popen, bound: float = WAIT) -> int | None:
    try:
        return p.wait(bound)
    except subprocess.TimeoutExpired:
        return None


# --- layout and source ------------------------------------------------------------------------

def test_python_structs_match_what_bcc_compiled(bpf_guard):
    """The loader's child reports BCC's field names; the kernel reports the sizes."""
    seen = 0
    for name, struct in layout.MAP_VALUES.items():
        m = bpf_guard._b[name]
        if name not in ("events",):
            assert ct.sizeof(struct) == map_info(m.map_fd).value_size, name
        if hasattr(struct, "_fields_"):
            assert m.compiled[1] == [f[0] for f in struct._fields_], name
            seen += 1
    assert seen >= 4          # procs, cgroups, streaks, policy
    assert bpf_guard._b["exes"].compiled[0] == ["ino", "dev"]


def test_the_daemon_maps_no_compiler(bpf_guard):
    maps = open("/proc/self/maps").read()
    assert "libLLVM" not in maps and "libclang" not in maps and "libbcc.so" not in maps


def test_print_source_is_what_is_loaded(bpf_guard):
    out = subprocess.run([PY, "-m", "dbguard.kernel.bpf", "--print-source"], capture_output=True,
                         text=True, check=True).stdout
    assert out == program_source() == bpf_guard.source
    assert '#include "dbguard.h"' not in out and "struct dbg_event {" in out
    assert "#define DBG_MAX_PROCS 16384" in out


def test_direct_reclaim_programs_jump_to_the_memcg_ones(bpf_guard):
    def prog_id(fd: int) -> int:
        for line in open(f"/proc/self/fdinfo/{fd}"):
            if line.startswith("prog_id:"):
                return int(line.split()[1])
        raise AssertionError("no prog_id in fdinfo")
    funcs = bpf_guard._b.funcs
    jump = bpf_guard._b[b"reclaim_jump"]
    for slot, target in ((0, b"tracepoint__vmscan__mm_vmscan_memcg_reclaim_begin"),
                         (1, b"tracepoint__vmscan__mm_vmscan_memcg_reclaim_end")):
        assert jump[ct.c_int(slot)].value == prog_id(funcs[target].fd)


def test_protections_report_names_each_bpf_protection():
    rows = protections()
    assert [r[0] for r in rows] == ["bpf_fork_inheritance", "bpf_reclaim_kill", "bpf_reclaim_cancel", "bpf_births",
                                    "bpf_oom_audit", "bpf_score_tamper"]
    assert all(active for _, active, _ in rows), rows


# --- fork inheritance -------------------------------------------------------------------------

FORKER = r"""
import os, sys, threading
n = int(sys.argv[1])
gate = threading.Event()
threads = [threading.Thread(target=gate.wait) for _ in range(4)]
for t in threads:
    t.start()
print("threads", *[t.native_id for t in threads], flush=True)
sys.stdin.readline()
r, w = os.pipe()
pids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    pids.append(pid)
os.close(r)
print("children", *pids, flush=True)
sys.stdin.readline()
os.close(w)
for pid in pids:
    os.waitpid(pid, 0)
gate.set()
print("reaped", flush=True)
sys.stdin.readline()
"""


def test_fork_inheritance_1000_children(bpf, procs):
    parent = run_code(procs, FORKER, "1000")
    threads = [int(x) for x in parent.stdout.readline().split()[1:]]
    bpf.sync_processes({parent.pid: (SHIELD | INHERIT, 1)}, {})
    before = bpf.counters()
    parent.stdin.write("fork\n"); parent.stdin.flush()
    children = [int(x) for x in parent.stdout.readline().split()[1:]]
    assert len(children) == 1000

    held = bpf.protected_tgids()
    missing = [c for c in children if c not in held]
    assert not missing, f"{len(missing)} children not protected at birth, e.g. {missing[:5]}"
    assert all(held[c] == (SHIELD | INHERIT | INHERITED, 1) for c in children)
    assert not set(threads) & set(held), "threads are not processes: no entries for them"
    assert bpf.counters()["fork_inherited"] - before["fork_inherited"] >= 1000

    # A sync that lists only the parent keeps the kernel's entries while the children live.
    bpf.sync_processes({parent.pid: (SHIELD | INHERIT, 1)}, {})
    held = bpf.protected_tgids()
    assert all(c in held for c in children)

    parent.stdin.write("exit\n"); parent.stdin.flush()
    assert parent.stdout.readline().strip() == "reaped"
    held = bpf.protected_tgids()
    left = [c for c in children if c in held]
    assert not left, f"{len(left)} exited children still in the map, e.g. {left[:5]}"
    assert parent.pid in held
    assert bpf.counters()["exit_removed"] - before["exit_removed"] >= 1000


def test_inherited_entries_go_when_their_ancestor_is_unprotected(bpf, procs):
    parent = run_code(procs, FORKER, "3")
    parent.stdout.readline()
    bpf.sync_processes({parent.pid: (SHIELD | INHERIT, 2)}, {})
    parent.stdin.write("fork\n"); parent.stdin.flush()
    children = [int(x) for x in parent.stdout.readline().split()[1:]]
    assert all(c in bpf.protected_tgids() for c in children)
    bpf.sync_processes({}, {})
    held = bpf.protected_tgids()
    assert not set(children) & set(held) and parent.pid not in held


# --- reclaim-time kill ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_file():
    """A file larger than the test cgroups, on disk (not tmpfs), out of the page cache."""
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="dbguard-cache-") as f:
        block = os.urandom(MiB)
        for _ in range(384):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        yield f.name


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _hog_and_protected(bpf, procs, cg, big_file, *, dry_run: bool):
    """A protected allocator that has met reclaim, and a candidate hog about to start."""
    drop_cache(big_file)
    # Holds 48 MiB, reads the file through the page cache (so its cgroup hits the limit and it
    # meets reclaim), then maps and frees 1 MiB every 50 ms (slowly, so that when the cgroup runs
    # out it is the hog whose reclaim fails, not this one).
    protected = start_hog(procs, cg, "--read", big_file, "--churn", "1M", "--churn-interval", "0.05",
                          total=48 * MiB, step=MiB, gate=False)
    bpf.sync_processes({protected.pid: (SHIELD, 0)}, {})
    before = bpf.counters()["reclaim_protected"]
    wait_holding(protected, "the protected allocator")
    assert bpf.counters()["reclaim_protected"] > before, "the protected process never met reclaim"
    hog = start_hog(procs, cg)
    # As the daemon does: the kernel's own choice, should it come first, falls on the candidate.
    with open(f"/proc/{hog.pid}/oom_score_adj", "w") as f:
        f.write("1000")
    bpf.sync_processes({protected.pid: (SHIELD, 0)}, {hog.pid: 1})
    bpf.set_policy(level=3, enabled=True, dry_run=dry_run, min_level_to_kill=3, fail_streak=3)
    go(hog)
    return protected, hog


def test_reclaim_kill_hits_candidate_and_spares_protected(bpf, procs, big_file):
    with MemoryCgroup(256 * MiB) as cg:
        before = bpf.counters()
        protected, hog = _hog_and_protected(bpf, procs, cg, big_file, dry_run=False)
        events = wait_events(bpf, lambda evs: any(e.kind == "kill" and e.tgid == hog.pid for e in evs))
        rc = wait_exit(hog)
        kills = [e for e in events if e.kind == "kill" and e.tgid == hog.pid]
        assert kills, f"no BPF kill event for the hog; events: {events}, counters: {bpf.counters()}"
        ev = kills[0]
        assert rc == -9, f"hog exit {rc}, expected SIGKILL"
        assert ev.path == "bpf" and ev.detail["signal_result"] == 0
        assert ev.detail["fail_streak"] >= 3 and ev.level == 3 and ev.flags & layout.EVF_CANDIDATE
        assert protected.poll() is None, (f"the protected process died (exit {protected.returncode}); "
                                          f"kernel OOM kills in the cgroup {cg.oom_kills()}, events {events}, counters {bpf.counters()}")
        assert not [e for e in events if e.tgid == protected.pid]
        after = bpf.counters()
        assert after["kills"] > before["kills"]
        rec = event_to_audit(ev)
        assert rec["path"] == "bpf" and rec["action"] == "kill" and str(hog.pid) in rec["target"]


def test_reclaim_dry_run_kills_nobody_and_says_what_it_would_do(bpf, procs, big_file):
    with MemoryCgroup(256 * MiB) as cg:
        before = bpf.counters()
        protected, hog = _hog_and_protected(bpf, procs, cg, big_file, dry_run=True)
        events = wait_events(bpf, lambda evs: any(e.kind == "would_kill" and e.tgid == hog.pid for e in evs))
        would = [e for e in events if e.kind == "would_kill" and e.tgid == hog.pid]
        assert would, f"no would_kill event; events: {events}, counters: {bpf.counters()}"
        rec = event_to_audit(would[0])
        assert rec["result"].startswith("dry_run") and rec["path"] == "bpf"
        assert "reclaim failed" in rec["reason"]
        assert protected.poll() is None, f"the protected process died (exit {protected.returncode})"
        # The test ends the hog itself now. A plain SIGKILL's victim is no OOM victim: while it
        # exits (slowly in the VM), the OOM killer would choose the protected allocator, so
        # the limit is lifted first (the hog's ending is the test's, not what it tests).
        cg.set_limit(4 * 256 * MiB)
        hog.kill(); hog.wait()
        events += bpf.poll(100)
        assert not [e for e in events if e.kind == "kill"]
        assert bpf.counters()["kills"] == before["kills"]
        assert protected.poll() is None


def test_a_shielded_allocator_stuck_in_reclaim_gets_the_listed_victim_killed(bpf, procs):
    """The shielded process is the one whose charge fails (a backend touching its shared
    buffers); the candidate holds its memory without allocating, so its own reclaim never
    fails: only the kill sent from the stuck task's reclaim can end it, and it does, in the
    kernel. Not asserted: that the shielded allocator then survives. With one victim and an
    allocator at full speed its charge can use up the kernel's 16 retries before the victim's
    memory is back (run of 08:09 UTC: it was SIGKILLed); the kernel's OOM killer does not know
    of a kill it did not send. tests/e2e/test_fast_hogs.py asserts the outcome next to a real
    database."""
    if "#define DBG_HAVE_SIGNAL_TASK 1" not in bpf.source:
        pytest.fail("the kill for another task needs bpf_send_signal_task (Linux 6.13); "
                    "this kernel got the fallback (test_kfunc_ids_agree_with_bpftool)", pytrace=False)
    with MemoryCgroup(200 * MiB) as cg:
        idle = start_hog(procs, cg, total=100 * MiB, gate=False)
        wait_holding(idle, "the idle candidate")
        shielded = start_hog(procs, cg, total=150 * MiB)
        start = int(open(f"/proc/{idle.pid}/stat").read().rsplit(")", 1)[1].split()[19])
        bpf.sync_processes({shielded.pid: (SHIELD, 0)}, {idle.pid: 1})
        bpf.set_scope(str(cg.path))
        bpf.set_listed_victims([(idle.pid, start, 1, "idle", str(cg.path))])
        bpf.set_policy(level=3, enabled=True, dry_run=False, min_level_to_kill=3, fail_streak=3)
        before = bpf.counters()
        go(shielded)
        events = wait_events(bpf, lambda evs: any(e.kind == "kill" and e.tgid == idle.pid for e in evs))
        kills = [e for e in events if e.kind == "kill" and e.tgid == idle.pid]
        assert kills, f"no BPF kill of the idle candidate; events: {events}, counters: {bpf.counters()}"
        assert wait_exit(idle) == -9
        ev = kills[0]
        assert ev.detail["for_pid"] == shielded.pid and ev.detail["signal_result"] == 0
        rec = event_to_audit(ev)
        assert rec["path"] == "bpf" and f"pid {shielded.pid}" in rec["reason"]
        assert bpf.counters()["kills_for_other"] > before["kills_for_other"]


def _rss(pid: int) -> int:
    """VmRSS of `pid` in bytes, from /proc (the kernel's own count of the mm's pages)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _holds_within(p: subprocess.Popen, bound: float) -> bool:
    """Whether hog `p` reports holding its memory within `bound` seconds (it may be stuck)."""
    done = threading.Event()

    def read():
        try:
            wait_holding(p)
            done.set()
        except AssertionError:
            pass            # it ended first (the control's hog, killed at the test's end)
    threading.Thread(target=read, daemon=True).start()
    return done.wait(bound)


@pytest.mark.parametrize("release", [True, False], ids=["released", "control"])
def test_a_bpf_killed_victim_that_cannot_exit_has_its_memory_released(bpf, procs, release, tmp_path):
    """The window the kernel's OOM killer used (docs/testing-vm.md, "Not yet"): a victim the BPF
    program SIGKILLed keeps its pages until its own exit frees them, and the kernel waits only
    for OOM victims of its own. Here the victim cannot exit at all (frozen by the v1 freezer:
    a SIGKILL does not thaw it) and the kernel's OOM killer is off in the cgroup (oom_kill_disable),
    so whatever frees the victim's memory is the daemon's reading of the kill event
    (KernelFeed.drain -> kernel.feed.released: process_mrelease by pidfd), whose audit record
    says so.
    Oracles: the victim's own VmRSS, and the shielded allocator getting the 150 MiB that fit
    under the 200 MiB limit only without the victim's 100 MiB. The control releases nothing:
    the memory stays and the allocator stays stuck, which is the old behaviour."""
    if "#define DBG_HAVE_SIGNAL_TASK 1" not in bpf.source:
        pytest.fail("the kill for another task needs bpf_send_signal_task (Linux 6.13); "
                    "this kernel got the fallback (test_kfunc_ids_agree_with_bpftool)", pytrace=False)
    freezer = Path("/sys/fs/cgroup/freezer")
    if not (freezer / "freezer.state").exists() and not (freezer / "cgroup.procs").exists():
        pytest.fail("needs the cgroup v1 freezer at /sys/fs/cgroup/freezer (mount -t cgroup -o freezer "
                    "freezer /sys/fs/cgroup/freezer)", pytrace=False)
    frozen = freezer / f"dbguard-test-{os.getpid()}"
    with MemoryCgroup(200 * MiB) as cg:
        (cg.path / "memory.oom_control").write_text("1")
        idle = start_hog(procs, cg, total=100 * MiB, gate=False)
        wait_holding(idle, "the victim")
        frozen.mkdir()
        try:
            (frozen / "cgroup.procs").write_text(str(idle.pid))
            (frozen / "freezer.state").write_text("FROZEN")
            deadline = time.monotonic() + WAIT
            while (frozen / "freezer.state").read_text().strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (frozen / "freezer.state").read_text().strip() == "FROZEN"
            held = _rss(idle.pid)
            assert held >= 95 * MiB, f"the victim holds {held >> 20} MiB, not its 100"
            shielded = start_hog(procs, cg, total=150 * MiB)
            bpf.sync_processes({shielded.pid: (SHIELD, 0)}, {idle.pid: 1})
            bpf.set_scope(str(cg.path))
            bpf.set_listed_victims([(idle.pid, start_time(idle.pid), 1, "idle", str(cg.path))])
            bpf.set_policy(level=3, enabled=True, dry_run=False, min_level_to_kill=3, fail_streak=3)
            # The daemon's own reading of the kernel's events: the kill is answered and audited there.
            daemon = Daemon(config.from_dict({}))
            daemon.feed = KernelFeed(bpf, daemon.cfg, [str(cg.path)])
            daemon.audit = AuditLog(str(tmp_path / "audit.jsonl"))
            daemon.metrics = Metrics("")
            go(shielded)
            if release:
                events = []
                deadline = time.monotonic() + WAIT
                while time.monotonic() < deadline and not any(e.kind == "kill" and e.tgid == idle.pid for e in events):
                    events += daemon.feed.drain(daemon)
                    time.sleep(0.02)
            else:
                events = wait_events(bpf, lambda evs: any(e.kind == "kill" and e.tgid == idle.pid for e in evs))
            kills = [e for e in events if e.kind == "kill" and e.tgid == idle.pid]
            assert kills, f"no BPF kill of the victim; events: {events}, counters: {bpf.counters()}"
            ev = kills[0]
            assert ev.detail["signal_result"] == 0 and ev.detail["start_time"] == start_time(idle.pid)
            if release:
                recs = [json.loads(line) for line in open(tmp_path / "audit.jsonl")]
                rec = next(r for r in recs if r["action"] == "kill" and r["pid"] == idle.pid)
                assert rec["path"] == "bpf" and rec["detail"]["memory_released"] is True, rec
                assert rec["result"] == "killed (SIGKILL in kernel; memory released at once)"
            assert _holds_within(shielded, pace.bound(5.0)) is release, \
                f"the shielded allocator {'never got' if release else 'got'} its 150 MiB"
            assert idle.poll() is None, "the victim exited: it was to stay frozen"
            left = _rss(idle.pid)
            if release:
                assert left < 10 * MiB, f"the victim still holds {left >> 20} MiB after the release"
            else:
                assert left >= 95 * MiB, f"the control's victim gave back memory ({left >> 20} MiB left)"
            assert cg.oom_kills() == 0
        finally:
            (frozen / "freezer.state").write_text("THAWED")
            wait_exit(idle)
            frozen.rmdir()


def test_a_stuck_shielded_allocator_gets_a_victim_of_its_own_scope_never_another_pods(bpf, procs):
    """Two pods on one node, each in its own memory cgroup, one guard: scope A's shielded
    allocator is stuck in reclaim. Pod B's candidate is the largest on the node, but its memory
    would free nothing under A's limit: the victim killed for A's task is A's own candidate,
    and B's survives untouched (no kill event for it, no kernel OOM kill in B)."""
    if "#define DBG_HAVE_SIGNAL_TASK 1" not in bpf.source:
        pytest.fail("the kill for another task needs bpf_send_signal_task (Linux 6.13); "
                    "this kernel got the fallback (test_kfunc_ids_agree_with_bpftool)", pytrace=False)
    with MemoryCgroup(200 * MiB) as a, MemoryCgroup(400 * MiB) as b:
        small = start_hog(procs, a, total=60 * MiB, gate=False)
        big = start_hog(procs, b, total=250 * MiB, gate=False)
        wait_holding(small, "scope A's candidate")
        wait_holding(big, "scope B's candidate")
        shielded = start_hog(procs, a, total=170 * MiB)      # fits in A alone, not beside A's candidate
        bpf.set_scopes([str(a.path), str(b.path)])
        bpf.set_scope_levels({str(a.path): 3, str(b.path): 3})     # a set: each scope's own level is its gate
        bpf.sync_processes({shielded.pid: (SHIELD, 0)}, {small.pid: 1, big.pid: 1})
        bpf.set_listed_victims([(big.pid, start_time(big.pid), 1, "big", str(b.path)),
                                (small.pid, start_time(small.pid), 1, "small", str(a.path))])
        bpf.set_policy(level=3, enabled=True, dry_run=False, min_level_to_kill=3, fail_streak=3)
        go(shielded)
        events = wait_events(bpf, lambda evs: any(e.kind == "kill" and e.tgid == small.pid for e in evs))
        kills = [e for e in events if e.kind == "kill" and e.tgid == small.pid]
        assert kills, f"no BPF kill of scope A's candidate; events: {events}, counters: {bpf.counters()}"
        assert kills[0].detail["for_pid"] == shielded.pid and wait_exit(small) == -9
        events += bpf.poll(200)
        assert not [e for e in events if e.tgid == big.pid], f"scope B's candidate was acted on: {events}"
        assert big.poll() is None, f"scope B's candidate died (exit {big.returncode})"
        assert b.oom_kills() == 0


def test_page_cache_full_cgroup_sees_no_kill(bpf, procs, big_file):
    """Reclaim that succeeds is normal: a cgroup full of page cache never triggers a kill."""
    drop_cache(big_file)     # read it back from disk, charged to the test cgroup
    with MemoryCgroup(128 * MiB) as cg:
        idle = run_code(procs, "import sys; sys.stdin.readline()", cg=cg)
        reader = start_hog(procs, cg, "--read", big_file, total=0, hold=0)   # page cache only
        bpf.sync_processes({}, {idle.pid: 1, reader.pid: 1})
        bpf.set_policy(level=3, enabled=True, dry_run=False, min_level_to_kill=3, fail_streak=3)
        before = bpf.counters()
        go(reader)
        wait_holding(reader, "the reader")
        assert wait_exit(reader) == 0
        events = bpf.poll(100)
        after = bpf.counters()
        assert cg.limit_hits() > 0, "the cgroup never hit its limit: the test proves nothing"
        assert after["kills"] == before["kills"] and after["would_kills"] == before["would_kills"]
        assert not [e for e in events if e.tgid in (idle.pid, reader.pid)]
        assert idle.poll() is None


# --- kernel OOM audit -------------------------------------------------------------------------

def test_kernel_oom_kill_is_audited_with_the_victim(bpf, procs):
    with MemoryCgroup(128 * MiB) as cg:
        hog = start_hog(procs, cg)
        go(hog)
        events = wait_events(bpf, lambda evs: any(e.kind == "oom_victim" and e.pid == hog.pid for e in evs))
        assert wait_exit(hog) == -9
        victims = [e for e in events if e.kind == "oom_victim" and e.pid == hog.pid]
        assert victims, f"no oom_victim event for the hog; events: {events}"
        assert cg.oom_kills() >= 1
        rec = event_to_audit(victims[0])
        assert rec["path"] == "kernel" and rec["action"] == "kernel_oom_kill"
        assert f"pid {hog.pid}" in rec["target"] and victims[0].comm in rec["target"]
        assert rec["result"] == "killed by the kernel"
        assert victims[0].detail["anon_rss_bytes"] > 0   # the kernel reads its per-cpu rss counters roughly


def test_kernel_oom_kill_of_a_protected_process_is_a_breach(bpf, procs):
    with MemoryCgroup(128 * MiB) as cg:
        hog = start_hog(procs, cg)
        bpf.sync_processes({hog.pid: (SHIELD, 0)}, {})
        go(hog)
        events = wait_events(bpf, lambda evs: any(e.pid == hog.pid for e in evs))
        assert wait_exit(hog) == -9
        ev = [e for e in events if e.pid == hog.pid]
        assert ev and ev[0].kind == "breach", events
        assert event_to_audit(ev[0])["result"].startswith("breach")


# --- shield tampering -------------------------------------------------------------------------

def test_raised_score_of_protected_process_is_reported_and_restored(bpf, procs, tmp_path):
    from dbguard.act.executor import Executor
    from dbguard.audit import AuditLog
    from dbguard.classify import classify
    from dbguard.model import Level, MemoryReading, Snapshot
    from dbguard.sense.procfs import read_procs

    victim = run_code(procs, "import sys; sys.stdin.readline()")
    bpf.sync_processes({victim.pid: (SHIELD, 0)}, {})
    start = int(open(f"/proc/{victim.pid}/oom_score_adj").read())
    subprocess.run(["sh", "-c", f"echo {start + 700} > /proc/{victim.pid}/oom_score_adj"], check=True)
    events = wait_events(bpf, lambda evs: any(e.kind == "score_tamper" and e.pid == victim.pid for e in evs))
    ev = [e for e in events if e.kind == "score_tamper" and e.pid == victim.pid]
    assert ev, events
    d = ev[0].detail
    assert (d["old_score_adj"], d["new_score_adj"], d["by_comm"]) == (start, start + 700, "sh")
    assert ev[0].path == "kernel" and "sh" in event_to_audit(ev[0])["reason"]
    # Put back through act/, like every other change to the host: pidfd-safe, audited.
    table = read_procs()
    snap = Snapshot(ts=time.time(), memory=MemoryReading("", 0, 0, None, 0.0, 0.0), procs=table,
                    roles=classify(table, [], os.getpid()), databases=(), self_pid=os.getpid())
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    out = Executor({}, audit).restore_score(victim.pid, d["old_score_adj"], "restore the shield", Level.OK, snap)
    assert out.carried_out and out.detail == f"oom_score_adj set to {start}", out
    assert int(open(f"/proc/{victim.pid}/oom_score_adj").read()) == start
    rec = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (rec["action"], rec["pid"], rec["value"], rec["outcome"]) == ("set_oom_score_adj", victim.pid, start, "done")
    # dbguard's own restore is not tampering.
    assert not [e for e in bpf.poll(100) if e.kind == "score_tamper" and e.pid == victim.pid]


# --- map sync ---------------------------------------------------------------------------------

def test_sync_diffs_candidates_and_cgroups(bpf, procs):
    a = run_code(procs, "import sys; sys.stdin.readline()")
    b = run_code(procs, "import sys; sys.stdin.readline()")
    bpf.sync_processes({a.pid: (SHIELD, 1)}, {b.pid: 2})
    assert bpf.protected_tgids() == {a.pid: (SHIELD, 1)}
    assert bpf.candidate_tgids() == {b.pid: 2}
    bpf.sync_processes({a.pid: (SHIELD | INHERIT, 3)}, {})
    assert bpf.protected_tgids() == {a.pid: (SHIELD | INHERIT, 3)}
    assert bpf.candidate_tgids() == {}
    bpf.sync_processes({a.pid: (SHIELD, 1)}, {a.pid: 4, b.pid: 2})
    assert bpf.protected_tgids() == {a.pid: (SHIELD, 1)}
    assert bpf.candidate_tgids() == {a.pid: 4, b.pid: 2}
    bpf.sync_processes({}, {})
    assert bpf.protected_tgids() == {} and bpf.candidate_tgids() == {}
    bpf.sync_cgroups({12345: (1, layout.ACTION_KILL)})
    assert bpf.cgroup_policies() == {12345: (1, layout.ACTION_KILL)}
    assert bpf._policy_map[ct.c_int(0)].n_cgroups == 1


def test_a_hash_map_read_in_batches_is_the_map_read_key_by_key(bpf):
    """items() reads hash maps with bpf_map_lookup_batch (BATCH entries a call): the same
    entries as get_next_key + lookup, across several batches."""
    from dbguard.kernel.maps import BATCH
    procs = bpf._b["procs"]
    written = {4_000_000 + i: 7_000 + i for i in range(2 * BATCH + 7)}
    for tgid, start in written.items():
        procs[ct.c_uint32(tgid)] = layout.Proc(SHIELD, 1, 0, tgid, 0, 0, start)
    try:
        batched = {k.value: v.start for k, v in procs.items()}
        assert procs._batched is True
        assert batched == {k.value: procs[k].start for k in procs.keys()}
        assert {t: s for t, s in batched.items() if t in written} == written
    finally:
        for tgid in written:
            del procs[ct.c_uint32(tgid)]


# --- fallback ---------------------------------------------------------------------------------

def test_without_bcc_the_reason_and_fix_are_one_line():
    code = ("import sys; sys.modules['bcc'] = None\n"
            "from dbguard.kernel.bpf import availability, BpfGuard\n"
            "from dbguard.errors import DbguardError\n"
            "print(availability())\n"
            "try:\n    BpfGuard.load()\nexcept DbguardError as e:\n    print('ERR', e)\n")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("(False,") and "python3-bpfcc" in lines[0]
    assert lines[1].startswith("ERR BPF unavailable") and "enabled = false" in lines[1] and len(lines) == 2


def _load_from(bpf_dir):
    """BpfGuard.load() in a fresh interpreter from the C in `bpf_dir`: (the run, its stdout lines)."""
    code = ("from dbguard.kernel.bpf import BpfGuard\n"
            "from dbguard.errors import DbguardError\n"
            "try:\n    BpfGuard.load()\nexcept DbguardError as e:\n    print('ERR', e)\n")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, DBGUARD_BPF_DIR=str(bpf_dir)))
    return out, out.stdout.splitlines()


def test_a_compile_error_in_the_loader_child_is_one_line(tmp_path):
    """The C is compiled in a child (dbguard.kernel.loader): its compiler error comes back as
    the daemon's one-line error, no traceback."""
    import shutil
    broken = tmp_path / "bpf"
    shutil.copytree(layout.BPF_DIR, broken)
    with open(broken / "oom.c", "a") as f:
        f.write("\nthis is not C;\n")
    out, lines = _load_from(broken)
    assert len(lines) == 1 and lines[0].startswith("ERR BPF programs failed to load: "), out
    assert "error" in lines[0] and "enabled = false" in lines[0]
    assert "Traceback" not in out.stderr



def test_a_verifier_rejection_in_the_loader_child_keeps_the_decisive_line(tmp_path):
    """A program the verifier refuses: the one-line error names the program and carries the
    verifier's own reason and instruction, not only its "processed N insns" summary."""
    import shutil
    broken = tmp_path / "bpf"
    shutil.copytree(layout.BPF_DIR, broken)
    src = (broken / "oom.c").read_text()
    bad = "TRACEPOINT_PROBE(oom, mark_victim)\n{\n    ((int (*)(int))0x0DBCFFFF)(1);\n"
    (broken / "oom.c").write_text(src.replace("TRACEPOINT_PROBE(oom, mark_victim)\n{\n", bad, 1))
    out, lines = _load_from(broken)
    assert len(lines) == 1 and lines[0].startswith("ERR BPF programs failed to load: "), out
    assert "tracepoint__oom__mark_victim: " in lines[0] and "func" in lines[0] and "call" in lines[0], lines[0]
    assert "processed " in lines[0] and "Traceback" not in out.stderr

PERF_PATH = r"""
import subprocess, sys, time
from dbguard.kernel.bpf import BpfGuard
g = BpfGuard.load()
assert not g.ringbuf and g.wake_fd() is None, "the copy should use the perf buffer"
g.set_scope(sys.argv[1])
g.set_policy(level=0, enabled=False, dry_run=True, births=True)
child = subprocess.Popen(["/bin/sleep", "5"], preexec_fn=lambda: open(sys.argv[1] + "/cgroup.procs", "w").write("0"))
seen, deadline = [], time.monotonic() + 20
while time.monotonic() < deadline and not any(e.kind == "birth" and e.pid == child.pid for e in seen):
    seen += g.poll(100)
child.kill(); child.wait(); g.close()
print("births", sorted({e.pid for e in seen if e.kind == "birth"} & {child.pid}) == [child.pid])
"""


def test_events_through_the_perf_buffer_before_linux_5_8(tmp_path):
    """Kernels without BPF ring buffers (before 5.8) send events through the perf buffer,
    read by libbpf's perf reader in the daemon: the C loaded with the ring buffer switched off."""
    import shutil
    perf = tmp_path / "bpf"
    shutil.copytree(layout.BPF_DIR, perf)
    for c in perf.glob("*.c"):
        c.write_text(c.read_text().replace("DBG_RINGBUF", "DBG_RINGBUF_SWITCHED_OFF"))
    with MemoryCgroup(256 * MiB) as cg:
        out = subprocess.run([PY, "-c", PERF_PATH, str(cg.path)], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, DBGUARD_BPF_DIR=str(perf)))
    assert out.returncode == 0 and out.stdout.strip() == "births True", out


def test_without_privilege_the_reason_names_capabilities():
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all",
                          PY, "-m", "dbguard.kernel.bpf", "--check"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 1, out
    assert out.stdout.strip().startswith("BPF unavailable: no CAP_BPF") and not out.stderr


# --- kernel struct offsets --------------------------------------------------------------------

def test_btf_offsets_agree_with_bpftool():
    """dbguard.kernel.btf's own parser against bpftool's reading of the same BTF (the oracle)."""
    import re
    from dbguard.kernel import btf
    raw = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    struct_re = re.compile(r"^\[\d+\] STRUCT '(\w+)' size=\d+ vlen=\d+\n((?:\t.*\n)*)", re.M)
    members: dict[str, dict[str, int]] = {}
    for name, body in struct_re.findall(raw):
        if name not in members:
            members[name] = {m: int(off) // 8 for m, off in re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", body)}
    got = btf.kernel_offsets()
    compared = 0
    for define, struct, path in btf.FIELDS:
        if path in members[struct]:       # mm_struct keeps exe_file in an anonymous struct
            assert got[define] == members[struct][path], (define, struct, path)
            compared += 1
    # task_struct.pending.signal.sig[0], nested: summed from bpftool's members (sig is sigset_t's only one)
    assert got["DBG_OFF_TASK_PENDING"] == members["task_struct"]["pending"] + members["sigpending"]["signal"]
    assert compared + 1 >= len(btf.FIELDS) - 1
    assert got["DBG_MEMORY_CGRP_ID"] == int(re.search(r"'memory_cgrp_id' val=(\d+)", raw).group(1))


def test_kfunc_ids_agree_with_bpftool(bpf):
    """The BTF ids the loader puts in its kfunc calls, against bpftool's reading (the oracle).
    A kernel with every kfunc (6.13 or later) gets the in-kernel kill for another task built; one
    without (Debian's 6.1 in the test VM) gets the fallback: no kfunc in the C the guard loaded."""
    import re
    from dbguard.kernel import btf
    raw = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    got = btf.kernel_kfuncs()
    present = set()
    for name in btf.KFUNCS:
        m = re.search(rf"^\[(\d+)\] FUNC '{name}' ", raw, re.M)
        if m:
            present.add(name)
            assert got.get(name) == int(m.group(1)), (name, got)
        else:
            assert name not in got, (name, got)
    if present == set(btf.KFUNCS):
        assert "#define DBG_HAVE_SIGNAL_TASK 1" in program_source()
        assert "#define DBG_HAVE_SIGNAL_TASK 1" in bpf.source
    else:
        assert "#define DBG_HAVE_SIGNAL_TASK" not in program_source()
        assert "#define DBG_HAVE_SIGNAL_TASK" not in bpf.source and "#define DBG_KF_" not in bpf.source
