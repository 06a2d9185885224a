"""Fast hogs (issue #19): rounds of processes that allocate at full speed, started together in a
memory cgroup next to a database, and what the kernel recorded of each round. Used by
tests/e2e/test_fast_hogs.py and the benchmark's fast-hogs scenario.
"""
from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lab.cgroup import MemoryCgroup
from lab.hog import spawn
from lab.procs import stop_all
from lab.watch import Kmsg, kmsg_oom_victims

MiB = 1024**2
HOGS, HOG_SIZE, HOG_STEP = 6, 110 * MiB, 8 * MiB
LIMIT = 900 * MiB
ROUND_BOUND = 30.0       # bound on one round, not an assertion about speed


@dataclass
class Round:
    pids: list[int]
    killed: int                                  # hogs that ended by SIGKILL
    oom_kills: int                               # the cgroup's kernel OOM kill counter, this round
    kmsg_victims: list[tuple[int, str]] = field(default_factory=list)   # the kernel log's, this round
    seconds: float = 0.0
    limit_hits: int = 0                          # charges that hit the cgroup's limit (v1 memory.failcnt), this round


def one_round(cg: MemoryCgroup, workdir: Path, name: str, kmsg: Kmsg, procs=None) -> Round:
    """HOGS hogs started together, HOG_STEP steps without pause up to HOG_SIZE; the round ends
    when each was killed or holds its memory (the survivors are then ended). `procs`: a
    lab.procs.Processes that cleans up after a failure."""
    oom_before, hits_before = cg.oom_kills(), cg.limit_hits()
    kmsg.read()
    t0 = time.monotonic()
    hogs, outs = [], [workdir / f"hog-{name}-{j}.out" for j in range(HOGS)]
    for out in outs:
        with open(out, "wb") as f:
            p = spawn(HOG_SIZE, HOG_STEP, 0, 600, preexec_fn=cg.preexec(), stdout=f)
            hogs.append(procs.add(p) if procs is not None else p)
    deadline = t0 + ROUND_BOUND
    while time.monotonic() < deadline:
        if all(p.poll() is not None or "holding" in o.read_text() for p, o in zip(hogs, outs)):
            break
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    codes = [p.poll() for p in hogs]
    stop_all(hogs)
    time.sleep(0.5)          # the kernel log's records of this round, if any, are written
    return Round(pids=[p.pid for p in hogs], killed=sum(c == -9 for c in codes),
                 oom_kills=cg.oom_kills() - oom_before, kmsg_victims=kmsg_oom_victims(kmsg.read(), cg.relpath),
                 seconds=round(seconds, 3), limit_hits=cg.limit_hits() - hits_before)


def kills_by_path(audit: list[dict], pids: list[int]) -> dict[str, int]:
    """How many of `pids` dbguard killed, by path ("bpf", "user"), and of the BPF kills how
    many were sent for a stuck task that may not be killed ("bpf_for_other")."""
    out: dict[str, set[int]] = {"bpf": set(), "user": set(), "bpf_for_other": set()}
    for r in audit:
        if (r.get("action") == "kill" and r.get("pid") in pids and r.get("path") in out
                and str(r.get("result", "")).startswith("killed")):
            out[r["path"]].add(r["pid"])
            if (r.get("detail") or {}).get("for_pid"):
                out["bpf_for_other"].add(r["pid"])
    return {k: len(v) for k, v in out.items()}


_COUNTER = re.compile(r'^dbguard_bpf_program_events_total\{counter="(\w+)"\} ([\d.e+]+)$', re.M)


def bpf_counters(metrics_url: str) -> dict[str, int]:
    """The BPF programs' own counters as dbguard exports them (dbguard_bpf_program_events_total)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    return {k: int(float(v)) for k, v in _COUNTER.findall(text)}
