"""Fast hogs (issue #19): rounds of processes that allocate at full speed, started together in a
memory cgroup next to a database, and what the kernel recorded of each round; the PostgreSQL
side of it (postgres_side). Used by tests/e2e/test_fast_hogs.py and the benchmark's fast-hogs
scenario.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from lab.cgroup import MemoryCgroup
from lab.hog import spawn
from lab.procs import stop_all
from lab.watch import Kmsg, kmsg_oom_victims

MiB = 1024**2
HOGS, HOG_SIZE, HOG_STEP = 6, 110 * MiB, 8 * MiB
LIMIT = 900 * MiB
SHARED_BUFFERS, PGBENCH_SCALE = "400MB", 20
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


@dataclass
class PgSide:
    """PostgreSQL and its pgbench load in the fast-hogs cgroup, with the guard watching."""
    cgroup: MemoryCgroup
    cluster: Any                # lab.pgcluster.PgCluster
    postmaster: int
    bench: subprocess.Popen
    guard: Any                  # what the guard's context manager gave

    def crash_recoveries(self) -> int:
        from lab.pgoutput import count_crash_recoveries
        return count_crash_recoveries(self.cluster.log())

    def server_up(self) -> bool:
        """The same postmaster still serves (no restart after a crash)."""
        return self.cluster.is_up() and self.cluster.postmaster_pid() == self.postmaster

    def healthy(self) -> str:
        """"" when all is well, else what is not (crash recoveries, postmaster, pgbench)."""
        problems = []
        if (n := self.crash_recoveries()):
            problems.append(f"{n} crash recovery lines in the server log")
        if not self.server_up():
            problems.append("postmaster down or restarted")
        if self.bench.poll() is not None:
            problems.append(f"pgbench ended (exit {self.bench.returncode})")
        return "; ".join(problems)

    def stop_bench(self) -> tuple[str, str]:
        """Ends pgbench; its (stdout, stderr)."""
        if self.bench.poll() is None:
            self.bench.terminate()
        out, err = self.bench.communicate(timeout=30)
        return out or "", err or ""


@contextlib.contextmanager
def postgres_side(workdir: Path, guard: Callable[[Any], ContextManager], log: Callable[[str], None],
                  warmup: float, room: int | None = None) -> Iterator[PgSide]:
    """PostgreSQL 15 (shared_buffers SHARED_BUFFERS, pgbench scale PGBENCH_SCALE) in a memory
    cgroup limited to LIMIT, `guard(env)` (a lab.scenario.ScenarioEnv, audit at
    workdir/audit.jsonl) watching, and `pgbench -S -c 4` running for `warmup` seconds; then,
    with `room`, the limit set to what the cgroup cannot give back (MemoryCgroup.unreclaimable:
    shared buffers and the processes' own memory, not the page cache) plus `room`."""
    from lab.pgcluster import PgCluster
    from lab.scenario import ScenarioEnv
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(MemoryCgroup(4096 * MiB))         # the data set loads unlimited
        cluster = stack.enter_context(PgCluster(settings={"shared_buffers": SHARED_BUFFERS}, cgroup=cg))
        cluster.pgbench_init(PGBENCH_SCALE)
        cg.set_limit(LIMIT)
        postmaster = cluster.postmaster_pid()
        env = ScenarioEnv(cg, cluster, workdir, workdir / "audit.jsonl", log)
        guarded = stack.enter_context(guard(env))
        bench = cluster.pgbench("-S", "-c", "4", "-j", "2", "-T", "3600", "--no-vacuum")
        stack.callback(lambda: (bench.poll() is None and bench.kill(), bench.wait()))
        time.sleep(warmup)          # the backends touch shared buffers, as on a server up a while
        if room is not None:
            held = cg.limit_above_held(room)
            log(f"PostgreSQL holds {held // MiB} MiB it cannot give back under pgbench; limit {cg.limit_bytes // MiB} MiB")
        yield PgSide(cg, cluster, postmaster, bench, guarded)
