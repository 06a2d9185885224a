"""The incremental process table against the real /proc and the kernel's process connector:
births, execs and exits are seen (with events and by listing), a reused pid is read again,
and a process's memory is read afresh under pressure, and at rest for the largest, while the
others' may lag at rest.
Oracle: /proc/PID read directly by the test (lab.procs), never through the table."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Iterator

import pytest

from dbguard.sense import procevents
from dbguard.sense.procevents import EXEC, EXIT, FORK, Changes, open_events, parse
from dbguard.sense.proctable import ProcTable
from lab import procs as lp
from lab import require


def _message(what: int, *pids: int) -> bytes:
    body = procevents.CN_MSG.pack(1, 1, 0, 0, 0, 0) + procevents.EVENT_HDR.pack(what, 0, 0) \
        + procevents.PIDS.pack(*pids, *([0] * (4 - len(pids))))
    return procevents.NLMSG_HDR.pack(procevents.NLMSG_HDR.size + len(body), 3, 0, 0, 0) + body


def test_parse_keeps_processes_and_leaves_threads_out():
    c = Changes()
    parse(_message(FORK, 10, 10, 11, 11), c)          # a process
    parse(_message(FORK, 10, 10, 12, 10), c)          # a thread of 10
    parse(_message(EXEC, 11, 11), c)
    parse(_message(EXIT, 12, 10), c)                  # the thread ends
    assert (c.born, c.execed, c.exited) == ({11}, {11}, set())
    parse(_message(EXIT, 11, 11), c)
    assert (c.born, c.execed, c.exited) == (set(), set(), {11})
    parse(_message(FORK, 10, 10, 11, 11), c)          # pid 11 reused: a birth again
    assert (c.born, c.exited) == ({11}, set())


def test_parse_several_messages_in_one_datagram():
    c = Changes()
    parse(_message(FORK, 1, 1, 20, 20) + _message(FORK, 1, 1, 21, 21), c)
    assert c.born == {20, 21}


@pytest.fixture
def events():
    require.root("the kernel's process connector (CAP_NET_ADMIN)")
    ev = open_events()
    if ev is None:
        pytest.fail("the netlink process connector gave no events here: it needs CAP_NET_ADMIN in the "
                    "initial namespaces and a kernel with CONFIG_PROC_EVENTS")
    yield ev
    ev.close()


def _spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("with_events", [True, False], ids=["events", "listing"])
def test_birth_exec_and_exit(request, with_events):
    ev = request.getfixturevalue("events") if with_events else None
    table = ProcTable(events=ev)
    table.refresh(fresh=False)
    p = _spawn(sys.executable, "-c", "import os,sys; sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '60'])")
    try:
        assert lp.wait_until(lambda: p.pid in table.refresh(fresh=False), 5)
        assert table.procs[p.pid].exe == sys.executable or table.procs[p.pid].exe.startswith("/usr/bin/python")
        p.stdin.write(b"go\n")
        p.stdin.flush()
        # An exec long after the fork: with events at once; by listing, at the latest when
        # the process is read afresh (under pressure, or in the slow sweep at rest).
        assert lp.wait_until(lambda: table.refresh(fresh=not with_events)[p.pid].exe == "/usr/bin/sleep", 5), \
            f"exec not seen: {table.procs.get(p.pid)}"
    finally:
        p.kill()
        p.wait()
    assert lp.wait_until(lambda: p.pid not in table.refresh(fresh=False), 5)


GROW = ("import sys; print('ready', flush=True); sys.stdin.readline(); b = bytearray(64 << 20); "
        "print('grown', flush=True); sys.stdin.readline()")


@contextlib.contextmanager
def grown(table: ProcTable) -> Iterator[tuple[int, int]]:
    """A process the table read at its start, then grown by 64 MiB: (its pid, the RSS the
    table read then); killed on the way out."""
    p = subprocess.Popen([sys.executable, "-c", GROW], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"ready"          # exec'd and running: its exec event is out
        assert lp.wait_until(lambda: p.pid in table.refresh(fresh=False), 5)
        small = table.procs[p.pid].rss_bytes
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == b"grown"
        yield p.pid, small
    finally:
        p.kill()
        p.wait()


def test_memory_read_afresh_under_pressure_only(events):
    table = ProcTable(events=events, top=0, sweep_seconds=3600)
    table.refresh(fresh=False)
    with grown(table) as (pid, small):
        real = lp.rss(pid)
        assert real > small + (60 << 20)
        assert table.refresh(fresh=False)[pid].rss_bytes == small      # at rest: not read again yet
        assert table.refresh(fresh=True)[pid].rss_bytes >= real - (4 << 20)


def test_the_largest_are_read_again_each_cycle_at_rest(events):
    """At rest the largest processes are read again every cycle, lightly (procfs.reread): their
    memory is this cycle's, and one that did not change keeps its Proc (nothing rests on it
    anew). `top` covers every process here, so the test's own one is among the largest."""
    table = ProcTable(events=events, top=1_000_000, sweep_seconds=3600)
    table.refresh(fresh=False)
    with grown(table) as (pid, small):
        real = lp.rss(pid)
        assert real > small + (60 << 20)
        assert table.refresh(fresh=False)[pid].rss_bytes >= real - (4 << 20)     # at rest, as one of the largest

        def unchanged() -> bool:
            """Once its memory has settled: the same Proc, holding what /proc says now."""
            before = table.procs[pid]
            now = table.refresh(fresh=False)[pid]
            return now is before and now.rss_bytes == lp.rss(pid)
        assert lp.wait_until(unchanged, 5)
