"""pss_above against the real /proc: PSS comes from /proc/PID/smaps_rollup and tells shared
memory from private memory where RSS cannot.

Two processes share one 96 MiB anonymous MAP_SHARED mapping (a parent and the child it
forked after touching every page): each has an RSS above 96 MiB, but a PSS of about half
of that. A third holds 96 MiB of private memory: its PSS is about its RSS. A rule
`pss_above = "80MiB"` therefore matches only the third, where `rss_above = "80MiB"`
matches all three. A process that is gone, or whose smaps_rollup is not ours to read,
does not match.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dbguard import config
from dbguard.model import Role
from dbguard.policy import Policy
from dbguard.sense.procfs import read_proc, read_pss
from lab import hog

MiB = 1024 * 1024
SIZE = 96 * MiB
REPO = Path(__file__).resolve().parents[2]


def start(mode: str, n: int) -> tuple[subprocess.Popen, list[int]]:
    """lab.hog holding SIZE until its stdin closes: private memory, or (shared) a MAP_SHARED
    mapping it touches, then forks; the child maps the same pages. Each process's pid from
    its "holding" line."""
    shared = ("--shared", "--fork") if mode == "shared" else ()
    p = hog.spawn(SIZE, SIZE, 0, 0, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  options=("--hold-stdin", *shared))
    pids = []
    for _ in range(n):
        line = hog.wait_holding(p, f"{mode} hog")
        pids.append(int(re.search(r"\(pid (\d+)", line).group(1)))
    return p, pids


def smaps_rollup_pss(pid: int) -> int:
    """PSS read here independently of dbguard: the "Pss:" line of smaps_rollup, in kB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for {pid}")


@pytest.fixture
def hogs():
    shared, shared_pids = start("shared", 2)
    private, (private_pid,) = start("private", 1)
    try:
        yield shared_pids, private_pid, private
    finally:
        for p in (shared, private):
            p.stdin.close()
            p.wait(10)


def test_pss_is_read_from_smaps_rollup_and_a_pss_rule_tells_shared_from_private(hogs):
    shared_pids, private_pid, private = hogs
    procs = {pid: read_proc(pid) for pid in (*shared_pids, private_pid)}
    pss = {pid: read_pss(p) for pid, p in procs.items()}
    for pid, p in procs.items():
        assert p.rss_bytes > SIZE, (pid, p.rss_bytes)
        # the same figure the kernel shows (the processes hold still: within a few pages)
        assert abs(pss[pid] - smaps_rollup_pss(pid)) < MiB, (pid, pss[pid])
    for pid in shared_pids:
        # half of the shared mapping each, plus the interpreter
        assert SIZE / 2 < pss[pid] < procs[pid].rss_bytes - 40 * MiB, (pid, pss[pid], procs[pid].rss_bytes)
    assert pss[private_pid] > SIZE and pss[private_pid] > procs[private_pid].rss_bytes - 16 * MiB

    def decided(rule: dict, reads: list[int]) -> dict[int, int | None]:
        def reader(p):
            reads.append(p.pid)
            return read_pss(p)
        cfg = config.from_dict({"kill": {"protect_exe": []},
                                "policy": {"rules": [{"name": "big", "action": "kill", **rule}]}})
        pol = Policy(cfg, watched_memcg=None, pss_reader=reader)
        verdicts = {pid: pol.judge.verdict(p, Role.OTHER, os.getpid()) for pid, p in procs.items()}
        for pid, v in verdicts.items():      # explain shows PSS where it was needed
            assert ("pss" in v.why) == (pid in reads) == (v.pss_bytes is not None), (pid, v)
        return {pid: v.rule_index for pid, v in verdicts.items()}

    reads: list[int] = []
    assert decided({"pss_above": "80MiB"}, reads) == {shared_pids[0]: None, shared_pids[1]: None, private_pid: 0}
    assert sorted(reads) == sorted(procs)
    reads.clear()
    assert decided({"rss_above": "80MiB"}, reads) == {shared_pids[0]: 0, shared_pids[1]: 0, private_pid: 0}
    assert reads == [], "no pss_above rule: smaps_rollup is never read"
    reads.clear()
    decided({"exe": "/nowhere/*", "pss_above": "80MiB"}, reads)
    assert reads == [], "the rule's exe condition fails first: PSS is not read"

    # gone: not read, no match, and explain says why
    stale = procs[private_pid]
    private.stdin.close()
    private.wait(10)
    assert read_pss(stale) is None
    cfg = config.from_dict({"kill": {"protect_exe": []},
                            "policy": {"rules": [{"pss_above": "80MiB", "action": "kill"}]}})
    v = Policy(cfg, pss_reader=read_pss).judge.verdict(stale, Role.OTHER, os.getpid())
    assert v.rule_index is None and "pss unknown" in v.why


@pytest.mark.root
def test_smaps_rollup_not_ours_to_read_is_none(hogs):
    """As an unprivileged user, a root process's smaps_rollup is refused (ptrace access): None."""
    _, pid, _ = hogs
    assert read_pss(read_proc(pid)) > SIZE, "root reads it"
    code = ("import sys\nfrom dbguard.sense.procfs import read_proc, read_pss\n"
            "p = read_proc(int(sys.argv[1]))\n"
            "print(p is not None and p.rss_bytes > 0, read_pss(p))\n")
    r = subprocess.run([sys.executable, "-c", code, str(pid)], capture_output=True, text=True, cwd=REPO,
                       preexec_fn=lambda: (os.setgroups([]), os.setgid(65534), os.setuid(65534)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "None"], "its status is readable, its smaps_rollup is not"
