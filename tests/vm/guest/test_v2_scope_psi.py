"""Per-cgroup PSI triggers as the wake-up, on a real cgroup v2 host (issue 15).

Two PostgreSQL servers, each in a memory cgroup of its own (A and B, 400 MiB each), one
`dbguard run` watching both as two scopes with a 60 s poll and no BPF. In A a hog is throttled
at a memory.high of 48 MiB that the test sets on a sub-group of A: it stalls on memory for
seconds while A's usage stays far under its limit. The cgroup is mounted with
memory_localevents for the test, so those memory.high events stay in the hog's sub-group and
A's own memory.events (which would also wake dbguard) stays quiet: in the first seconds of the
stall, A's PSI trigger is the one thing that can wake the loop for A.

Asserted: dbguard put its PSI triggers on each scope's own memory.pressure (not on
/proc/pressure/memory); A's first level change comes from A's own PSI (its reason names PSI,
not host-wide, at a usage under the warn mark), in a cycle its record says A's PSI trigger
woke; the hog is killed by dbguard (path user, scope A); B has no level change and no answer;
the kernel's own stall counters (`some total=`) as the oracle: A stalled for more than the
trigger's threshold, B did not; no kernel OOM kill in either; both servers up and the same;
dbguard runs on. Every wait is bounded (lab/pace stretches the bounds in the VM, at most 10
times): a failing run ends within minutes.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import subprocess
import time
from pathlib import Path

import pytest

from dbguard.sense.memtext import psi_some_total
from lab import hog, pace
from lab.launcher import DbguardRun, audit_names, base_config
from lab.pgcluster import PgCluster
from lab.procs import wait_until
from lab.scopes import shut_down

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.db]

MiB = 1024**2
LIMIT = 400 * MiB
HIGH = 48 * MiB             # the hog's sub-group: throttled here, far under A's warn mark (80 % of 400 MiB)
STALL_US, WINDOW_US = 50_000, 2_000_000       # dbguard's default trigger, written out: the oracle's threshold
CGROUP2 = "/sys/fs/cgroup"
MS_REMOUNT, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RELATIME = 32, 2, 4, 8, 1 << 21
MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "relatime": MS_RELATIME}


def _cgroup2_options() -> tuple[int, list[str]]:
    """The cgroup2 mount's flags (nosuid, ...) and its superblock options (nsdelegate, ...)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == CGROUP2:
            mount_opts, super_opts = fields[5], line.split(" - ", 1)[1].split()[2]
            flags = sum(MOUNT_FLAGS.get(o, 0) for o in mount_opts.split(","))
            return flags, [o for o in super_opts.split(",") if o not in ("rw", "ro")]
    raise AssertionError(f"no cgroup2 mount at {CGROUP2}")


def _remount(options: list[str]) -> None:
    # mount(2) itself: a cgroup2 remount sets every root flag anew, so all of them are given.
    flags, _ = _cgroup2_options()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"cgroup2", CGROUP2.encode(), b"cgroup2", MS_REMOUNT | flags, ",".join(options).encode()) != 0:
        err = ctypes.get_errno()
        raise AssertionError(f"remount of {CGROUP2} with {options} failed: {os.strerror(err)}")


@pytest.fixture
def local_events():
    """memory_localevents on the cgroup2 mount for the test, the mount's options put back after."""
    _, before = _cgroup2_options()
    _remount([o for o in before if o != "memory_localevents"] + ["memory_localevents"])
    assert "memory_localevents" in _cgroup2_options()[1], "the remount did not take memory_localevents"
    try:
        yield
    finally:
        _remount(before)


def stall_us(cg_path: Path) -> int:
    return psi_some_total((cg_path / "memory.pressure").read_text())


def events(path: Path, name: str = "memory.events") -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split() for ln in (path / name).read_text().splitlines())}


def test_a_scope_is_woken_by_its_own_cgroup_psi_trigger(tmp_path, make_cgroup, procs, postgresql_host, local_events):
    cgs = {"a": make_cgroup(LIMIT), "b": make_cgroup(LIMIT)}
    for cg in cgs.values():     # sub-groups with the memory controller: the server in db/, the hog in hog/
        (cg.path / "cgroup.subtree_control").write_text("+memory")
    hog_cg = cgs["a"].child("hog")
    (hog_cg.path / "memory.high").write_text(str(HIGH))
    clusters = {x: PgCluster(settings={"shared_buffers": "32MB"}, cgroup=cg.child("db")) for x, cg in cgs.items()}
    daemon = None
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:     # initdb is the slow part under TCG
            list(pool.map(lambda c: c.start(), clusters.values()))
        servers = {x: c.postmaster_pid() for x, c in clusters.items()}
        cfg = base_config(tmp_path)
        cfg["general"].update(interval=60, discover=False)        # the poll cannot explain a wake-up
        cfg["bpf"] = {"enabled": False}                           # nor can the BPF ring buffer
        cfg["pressure"] = {"psi_trigger_stall_us": STALL_US, "psi_trigger_window_us": WINDOW_US}
        cfg["databases"] = [{"kind": "postgresql", "name": f"pg-{x}", "dsn": c.dsn} for x, c in clusters.items()]
        # Started now, growing at the word: its interpreter's start (seconds under TCG) comes
        # before dbguard's, so the stall begins right after dbguard's first cycle, far from its next poll.
        h = procs.add(hog.spawn(4 * HIGH, 4 * MiB, 0, hold=600, preexec_fn=cgs["a"].preexec("hog"),
                                stdout=subprocess.DEVNULL, stdin=subprocess.PIPE, options=("--gate",)))
        daemon = DbguardRun(tmp_path, cfg)
        daemon.wait_protecting(timeout=30, settle=2)
        scope = {x: str(cg.path) for x, cg in cgs.items()}
        # The trigger on each scope's own file, as dbguard's start log says (its lines follow the record).
        trigger = {x: f"scope {scope[x]}: PSI trigger 'some {STALL_US} {WINDOW_US}' on {scope[x]}/memory.pressure"
                   for x in cgs}
        wait_until(lambda: all(t in daemon.output(limit=10**6) for t in trigger.values()), pace.bound(10))
        said = daemon.output(limit=10**6)
        assert all(t in said for t in trigger.values()), said[-3000:]
        assert "on /proc/pressure/memory" not in said, f"a trigger on the host's PSI: {said[-3000:]}"
        stall0 = {x: stall_us(cg.path) for x, cg in cgs.items()}
        events0 = events(cgs["a"].path)

        began = time.time()
        h.stdin.write(b"go\n")
        h.stdin.flush()
        first = daemon.wait_record(lambda r: r.get("action") == "level_change" and r.get("scope") == scope["a"]
                                   and float(r["ts"]) >= began, 15, "a level change in A")
        daemon.wait_record(lambda r: r.get("action") == "kill" and audit_names(r, h.pid), 15, "the hog in A killed")
        h.wait(30)
        stall = {x: stall_us(cg.path) - stall0[x] for x, cg in cgs.items()}
        audit = daemon.audit(since=began)
        hog_events, a_events = events(hog_cg.path, "memory.events.local"), events(cgs["a"].path)
        oom_kills = {x: cg.oom_kills() for x, cg in cgs.items()}
        answering = {x: c.psql("SELECT 1") == "1" and c.postmaster_pid() == servers[x] for x, c in clusters.items()}
        running, output = daemon.running(), daemon.output(limit=10**6)
    finally:
        shut_down(daemon, clusters.values())

    text = "\n".join(str(r) for r in audit if r.get("action") != "set_oom_score_adj")
    print(f"\nfirst level change in A {float(first['ts']) - began:.1f} s after the hog started: {first}")
    print(f"stall (some total) A {stall['a'] / 1000:.0f} ms, B {stall['b'] / 1000:.0f} ms; "
          f"hog sub-group events {hog_events}, A's {a_events}")
    assert hog_events.get("high", 0) > 0, f"the hog was never throttled at memory.high: {hog_events}"
    assert a_events == events0, f"A's own memory.events moved (a limit wake-up was possible): {events0} -> {a_events}"
    assert stall["a"] >= STALL_US, f"A stalled only {stall['a']} us: the stimulus did not work"
    assert first["woken_by"] == ["psi"], f"A's level change was not brought by A's own PSI trigger: {first}"
    assert first["reason"].startswith("PSI ") and "host-wide" not in first["reason"], first
    assert first["usage_bytes"] < 0.8 * LIMIT, f"A's usage, not its PSI, could explain the level: {first}"
    kills = [r for r in audit if r.get("action") == "kill" and audit_names(r, h.pid)]
    assert kills and all(r.get("path") == "user" and r.get("scope") == scope["a"] for r in kills), text
    assert not [r for r in audit if r.get("scope") == scope["b"] and r.get("action") != "set_oom_score_adj"], \
        f"B was judged or answered while only A was pressed:\n{text}"
    assert stall["b"] < STALL_US, f"B stalled {stall['b']} us: the test's premise (B at rest) did not hold"
    assert oom_kills == {"a": 0, "b": 0}, f"the kernel OOM killer struck: {oom_kills}\n{text}"
    assert answering == {"a": True, "b": True}, f"not the same servers answering: {answering}"
    assert running, output[-2000:]
