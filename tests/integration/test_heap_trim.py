"""host.trim_heap gives freed heap pages back while dbguard's memory is locked (issue #17).

lock_memory locks every page dbguard touches (mlockall, on fault), and the kernel discards no
page of a locked range: a plain malloc_trim then frees nothing but the top of the heap. Each
case runs in a child process (mlockall would lock pytest itself): it fragments glibc's heap
with freed 1000-byte blocks among kept ones, then trims. The oracle is the kernel's own
accounting: RssAnon in /proc/self/status and the [heap] mapping's flags in /proc/self/smaps
("lo": locked, "lf": locked on fault), not anything trim_heap reports.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab.launcher import REPO

pytestmark = pytest.mark.root

MiB = 1024 * 1024

# What both children do first: lock memory as the daemon does (one arena first when asked).
PRELUDE = r"""
import ctypes, json, sys, threading
from dbguard import host

def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

def fragment():
    # 20,000 blocks of 1000 bytes (above pymalloc's 512: glibc's heap), one in 20 kept: the freed
    # ones lie between live ones, so only madvise, not lowering the break, can give them back.
    blocks = [bytes(1000) for _ in range(20000)]
    return blocks[::20]

if sys.argv[1] == "one arena":
    host.one_malloc_arena()
note = host.lock_memory()
if not note.startswith("memory locked"):
    print(json.dumps({"error": note})); sys.exit()
"""

CHILD = PRELUDE + r"""
def heap_flags():
    lines = open("/proc/self/smaps").read().splitlines()
    at = next(i for i, l in enumerate(lines) if l.endswith("[heap]"))
    return next(l.split()[1:] for l in lines[at + 1:] if l.startswith("VmFlags:"))

kept = fragment()
before = anon()
if sys.argv[1] == "plain":
    ctypes.CDLL(None).malloc_trim(0)
else:
    host.trim_heap()
print(json.dumps({"before": before, "after": anon(), "flags": heap_flags(), "kept": len(kept)}))
"""


def _child(how: str, code: str = CHILD) -> dict:
    out = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert "error" not in got, f"needs CAP_IPC_LOCK (run as root) to lock memory: {got['error']}"
    return got


def test_trim_heap_gives_back_freed_pages_and_keeps_the_heap_locked():
    got = _child("trim_heap")
    # ~18 MiB freed between kept blocks; most of it must leave RSS.
    assert got["before"] - got["after"] >= 12 * MiB, got
    assert "lo" in got["flags"] and "lf" in got["flags"], f"[heap] no longer locked on fault: {got['flags']}"


def test_plain_malloc_trim_frees_nothing_of_a_locked_heap():
    """The control: why trim_heap unlocks around the trim. If a kernel ever discards locked
    pages, this fails and the unlocking can go."""
    got = _child("plain")
    assert got["before"] - got["after"] < 2 * MiB, got
    assert "lo" in got["flags"], got["flags"]


# As CHILD, but the blocks are allocated and freed in a thread, as the bounded SQL calls' worker does.
THREAD_CHILD = PRELUDE + r"""
kept = []
t = threading.Thread(target=lambda: kept.extend(fragment()))
t.start()
t.join()
before = anon()
host.trim_heap()
print(json.dumps({"before": before, "after": anon(), "kept": len(kept)}))
"""


def test_with_one_arena_trim_heap_gives_back_what_a_thread_freed():
    got = _child("one arena", THREAD_CHILD)
    assert got["before"] - got["after"] >= 12 * MiB, got


def test_a_threads_own_arena_keeps_what_it_freed():
    """The control: why one_malloc_arena. A thread's own glibc arena stays locked through
    trim_heap, which unlocks only the main one."""
    got = _child("own arena", THREAD_CHILD)
    assert got["before"] - got["after"] < 2 * MiB, got
