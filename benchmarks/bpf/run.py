"""Cost of dbguard's BPF programs on the real kernel.

    sudo .venv/bin/python -m benchmarks.bpf.run [--rounds 7] [--write]

Per program: median over rounds of run_time_ns/run_cnt (kernel.bpf_stats_enabled=1, read
from the program's fdinfo, the same counters `bpftool prog show` prints) under a fork storm
and a reclaim storm; JIT bytes from `bpftool prog show`; each map's memlock at the default
sizes; and BpfGuard.load() time (compile + attach). --write puts the table in RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dbguard.kernel.bpf import INHERIT, SHIELD, BpfGuard
from lab import hog
from lab.cgroup import MemoryCgroup

MiB = 1024**2
HERE = Path(__file__).resolve().parent
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
TARGET_NS = {"reclaim": 150, "fork": 300}

FORK_STORM = r"""
import os, sys
n = int(sys.argv[1])
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


# Empty programs on the same tracepoints, attached beside dbguard's: the cost of merely
# running a BPF program here (bpf_stats accounting included), to read the figures against.
BASELINE = """
TRACEPOINT_PROBE(task, task_newtask) { return 0; }
TRACEPOINT_PROBE(sched, sched_process_exit) { return 0; }
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin) { return 0; }
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end) { return 0; }
"""


def fdinfo(fd: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def _name(n) -> str:
    return (n.decode() if isinstance(n, bytes) else n).removeprefix("tracepoint__")


def prog_stats(bpfs) -> dict[str, tuple[int, int]]:
    """program name -> (run_time_ns, run_cnt); names of the baseline programs get a 'baseline:' prefix"""
    out = {}
    for prefix, b in bpfs:
        for name, fn in b.funcs.items():
            info = fdinfo(fn.fd)
            out[prefix + _name(name)] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return out


def jited_bytes(b) -> dict[str, int]:
    out = {}
    for name, fn in b.funcs.items():
        pid = int(fdinfo(fn.fd)["prog_id"])
        show = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)],
                                         capture_output=True, text=True, check=True).stdout)
        out[_name(name)] = int(show.get("bytes_jited", 0))
    return out


def map_memlock(g: BpfGuard) -> dict[str, int]:
    out = {}
    for name in (b"procs", b"cgroups", b"policy", b"counters", b"events", b"reclaim_jump"):
        out[name.decode()] = int(fdinfo(g._b[name].map_fd).get("memlock", 0))
    return out


def measured(bpfs, run) -> dict[str, tuple[int, int]]:
    before = prog_stats(bpfs)
    run()
    after = prog_stats(bpfs)
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}


def fork_storm(g: BpfGuard, n: int, protected: bool) -> None:
    """n forks, each reaped before the next; the parent protected with INHERIT or not at all."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + FORK_STORM, str(n)],
                         stdin=subprocess.PIPE, text=True)
    if protected:
        g.sync_processes({p.pid: (SHIELD | INHERIT, 1)}, {})
    p.stdin.write("go\n"); p.stdin.close()
    p.wait()
    g.sync_processes({}, {})


def cache_storm(g: BpfGuard, cache_file: str) -> None:
    """A kill candidate reads a file twice the cgroup's size: reclaim all the time, all of it succeeding."""
    with MemoryCgroup(64 * MiB) as cg:
        fd = os.open(cache_file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        r = hog.spawn(0, MiB, 0, 0, preexec_fn=cg.preexec(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                      options=("--gate", "--read", cache_file, "--passes", "2", "--drop-cache"))
        g.sync_processes({}, {r.pid: 1})
        g.set_policy(level=3, enabled=True, dry_run=False)
        r.stdin.write(b"go\n"); r.stdin.close()
        r.wait()
        g.set_policy(level=0, enabled=False, dry_run=False)
        g.sync_processes({}, {})


def hog_storm(g: BpfGuard) -> None:
    """An anonymous hog (candidate) in a 128 MiB cgroup until the BPF program kills it."""
    with MemoryCgroup(128 * MiB) as cg:
        h = hog.spawn(hog.UNLIMITED, 8 * MiB, 0, 0, preexec_fn=cg.preexec(), stdin=subprocess.PIPE,
                      stdout=subprocess.DEVNULL, options=("--gate",))
        g.sync_processes({}, {h.pid: 1})
        g.set_policy(level=3, enabled=True, dry_run=False)
        h.stdin.write(b"go\n"); h.stdin.close()
        try:
            h.wait(60)
        finally:
            if h.poll() is None:
                h.kill()
                h.wait()
        g.set_policy(level=0, enabled=False, dry_run=False)
        g.sync_processes({}, {})
        g.poll(0)


def per_call(rounds: list[dict[str, tuple[int, int]]], prog: str) -> tuple[float | None, int]:
    """Median over rounds of the round's mean ns per call, and the calls counted."""
    vals = [t / c for r in rounds for (t, c) in [r.get(prog, (0, 0))] if c]
    calls = sum(r.get(prog, (0, 0))[1] for r in rounds)
    return (statistics.median(vals) if vals else None), calls


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--forks", type=int, default=1000)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()

    load_times = []
    for _ in range(3):
        t = time.monotonic()
        g = BpfGuard.load()
        load_times.append(time.monotonic() - t)
        g.close()

    from bcc import BPF
    old_stats = STATS.read_text().strip()
    STATS.write_text("1")
    g = BpfGuard.load()
    base = BPF(text=BASELINE.encode())
    bpfs = [("", g._b), ("baseline:", base)]
    try:
        jit = jited_bytes(g._b)
        mem = map_memlock(g)
        scen: dict[str, list] = {"fork, protected parent": [], "fork, plain parent": [],
                                 "page-cache reclaim": [], "anon hog until kill": []}
        with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="dbguard-bench-") as f:
            block = os.urandom(MiB)
            for _ in range(128):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            for _ in range(a.rounds):
                scen["fork, protected parent"].append(measured(bpfs, lambda: fork_storm(g, a.forks, True)))
                scen["fork, plain parent"].append(measured(bpfs, lambda: fork_storm(g, a.forks, False)))
                scen["page-cache reclaim"].append(measured(bpfs, lambda: cache_storm(g, f.name)))
                scen["anon hog until kill"].append(measured(bpfs, lambda: hog_storm(g)))
        counters = g.counters()
    finally:
        base.cleanup()
        g.close()
        STATS.write_text(old_stats)

    progs = {"task__task_newtask": ("fork", ["fork, protected parent", "fork, plain parent"]),
             "sched__sched_process_exit": ("fork", ["fork, protected parent", "fork, plain parent"]),
             "vmscan__mm_vmscan_memcg_reclaim_begin": ("reclaim", ["page-cache reclaim", "anon hog until kill"]),
             "vmscan__mm_vmscan_memcg_reclaim_end": ("reclaim", ["page-cache reclaim", "anon hog until kill"])}
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on Linux {platform.release()}, "
             f"{os.cpu_count()} shared cores; {a.rounds} rounds of each load, {a.forks} forks per fork round; "
             f"`{' '.join(['python -m benchmarks.bpf.run'] + sys.argv[1:])}`", "",
             "Median over rounds of run_time_ns/run_cnt. 'empty program' is an empty BPF program on the same "
             "tracepoint in the same round: the floor of running any program here (stats accounting included).", "",
             "| program | load | median ns/call | empty program ns/call | calls | target |",
             "|---|---|---|---|---|---|"]
    for prog, (kind, loads) in progs.items():
        for load in loads:
            med, calls = per_call(scen[load], prog)
            bmed, _ = per_call(scen[load], "baseline:" + prog)
            fmt = lambda v: "-" if v is None else f"{v:.0f}"
            lines.append(f"| {prog} | {load} | {fmt(med)} | {fmt(bmed)} | {calls} | ≤ {TARGET_NS[kind]} ns |")
    for prog in ("oom__mark_victim", "oom__oom_score_adj_update"):
        rounds = [r for v in scen.values() for r in v]
        med, calls = per_call(rounds, prog)
        lines.append(f"| {prog} | all | {'-' if med is None else f'{med:.0f}'} | - | {calls} | - |")
    lines += ["", "| program | JIT bytes |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(jit.items())]
    total_jit = sum(jit.values())
    lines += ["", f"JIT code, all programs: {total_jit} bytes ({total_jit / 1024:.2f} KiB; target ≤ 4 KiB)", "",
              "| map (default sizes) | memlock bytes |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in mem.items()]
    total_mem = sum(mem.values())
    lines += ["", f"Maps, all: {total_mem} bytes ({total_mem / MiB:.3f} MiB; target ≤ 1 MiB)", "",
              f"BpfGuard.load() (compile + attach), 3 runs: {', '.join(f'{x:.3f}' for x in load_times)} s; "
              f"median {statistics.median(load_times):.3f} s (target ≤ 1 s)", "",
              f"Counters after the run: {counters}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        results = HERE / "RESULTS.md"
        head = results.read_text().split("<!-- results -->")[0] if results.exists() else "# BPF benchmark\n\n"
        results.write_text(head + "<!-- results -->\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
