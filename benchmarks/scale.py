"""Scale: how long one sidecar cycle takes with many processes on the host.

The cycle's process part is dbguard.sense.procfs.read_procs() plus dbguard.classify.classify();
it is timed with 1,000 and 10,000 extra sleeping processes (real ones, /bin/sleep, in a memory
cgroup of their own), and with 500 PostgreSQL backends (a throwaway cluster, 500 open
connections), where the whole user-space cycle (Sensor.snapshot(): pressure, /proc, SQL
collect, classify; then Policy.decide() in dry-run) is timed as well.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from dbguard.classify import classify
from dbguard.sense.procfs import read_procs
from lab.cgroup import MemoryCgroup

MiB = 1024 * 1024
ROUNDS = 7

# Spawns N /bin/sleep children, says "ready", and on the next stdin line kills and reaps them
# (so no zombie is left for an init that may not reap).
SPAWNER = r"""
import os, signal, sys
n = int(sys.argv[1])
pids = [os.posix_spawn("/bin/sleep", ["sleep", "3600"], {}) for _ in range(n)]
print("ready", flush=True)
sys.stdin.readline()
for p in pids:
    os.kill(p, signal.SIGKILL)
for p in pids:
    os.waitpid(p, 0)
"""


def _time(fn: Callable[[], object], rounds: int = ROUNDS) -> tuple[dict, dict, object]:
    walls, cpus, last = [], [], None
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        last = fn()
        cpus.append((time.process_time() - c) * 1000)
        walls.append((time.perf_counter() - w) * 1000)

    def st(v):
        return {"median": statistics.median(v), "lo": min(v), "hi": max(v)}
    return st(walls), st(cpus), last


def _cycle(stats=()):
    procs = read_procs()
    classify(procs, stats, os.getpid())
    return len(procs)


@contextlib.contextmanager
def sleepers(n: int):
    with MemoryCgroup(4096 * MiB) as cg:
        p = subprocess.Popen([sys.executable, "-c", SPAWNER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, preexec_fn=cg.preexec())
        try:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"could not spawn {n} sleeping processes")
            yield
        finally:
            with contextlib.suppress(OSError):
                p.stdin.write("done\n")
                p.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(60)


def _row(case: str, fn, detail: str) -> dict:
    wall, cpu, n = _time(fn)
    return {"case": case, "processes": n, "wall_ms": wall, "cpu_ms": cpu, "detail": detail}


def _pg_backends(n: int, log) -> list[dict]:
    import psycopg

    from dbguard import config
    from dbguard.assess import assess
    from dbguard.daemon import build_policy
    from dbguard.policy import PolicyState
    from dbguard.sensor import Sensor
    from lab.pgcluster import PgCluster

    rows = []
    with MemoryCgroup(6144 * MiB) as cg, \
            PgCluster(settings={"max_connections": str(n + 20), "shared_buffers": "128MB"}, cgroup=cg) as cluster, \
            tempfile.TemporaryDirectory(prefix="dbguard-bench-scale-") as tmp:
        with ThreadPoolExecutor(8) as ex:
            conns = list(ex.map(lambda _: psycopg.connect(cluster.dsn, autocommit=True), range(n)))
        try:
            log(f"{n} backends connected")
            cfg = config.from_dict({
                "general": {"state_dir": tmp, "dry_run": True},
                "databases": [{"name": "bench", "kind": "postgresql", "dsn": cluster.dsn}],
                "pressure": {"cgroup": str(cg.path)},
                "audit": {"path": os.path.join(tmp, "audit.jsonl")},
                "metrics": {"listen": ""},
            })
            sensor = Sensor(cfg)
            try:
                stats = sensor.collect()
                sensor.open_pressure(stats)
                rows.append(_row(f"{n} PostgreSQL backends", lambda: _cycle(stats),
                                 "read_procs + classify (roles by parentage of the postmaster)"))
                policy, state = build_policy(cfg, sensor, True), PolicyState()

                def full():
                    snap = sensor.snapshot()
                    policy.decide(snap, assess(snap.memory, cfg.pressure, state.levels, snap.ts), state)
                    return len(snap.procs)
                rows.append(_row(f"{n} PostgreSQL backends, whole cycle", full,
                                 "Sensor.snapshot (pressure, /proc, SQL collect, classify) + assess + Policy.decide"))
            finally:
                sensor.close()
        finally:
            for c in conns:
                c.close()
    return rows


def run(quick: bool = False, log=print) -> dict:
    rows = [_row("this host as it is", _cycle, "read_procs + classify")]
    log(f"host: {rows[-1]['wall_ms']['median']:.1f} ms for {rows[-1]['processes']} processes")
    for n in ((1000,) if quick else (1000, 10000)):
        with sleepers(n):
            rows.append(_row(f"host + {n:,} sleeping processes", _cycle, "read_procs + classify"))
        log(f"+{n}: {rows[-1]['wall_ms']['median']:.1f} ms for {rows[-1]['processes']} processes")
    try:
        rows += _pg_backends(100 if quick else 500, log)
        log(f"backends: {rows[-1]['wall_ms']['median']:.1f} ms whole cycle")
    except Exception as e:        # the process figures stand on their own
        log(f"PostgreSQL backends case failed: {type(e).__name__}: {e}")
        rows.append({"case": "PostgreSQL backends", "processes": 0, "wall_ms": {"median": 0, "lo": 0, "hi": 0},
                     "cpu_ms": {"median": 0, "lo": 0, "hi": 0}, "detail": f"failed: {e}"[:200]})
    return {"method": __doc__.split("\n\n", 1)[1].replace("\n", " ").strip()
            + f" Median of {ROUNDS} cycles in one process (wall, and CPU from time.process_time); "
            f"range in brackets. {os.cpu_count()} cores; the host's load average at the start is in the provenance.",
            "rows": rows}
