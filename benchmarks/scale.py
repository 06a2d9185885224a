"""Scale: how long one sidecar cycle takes with many processes on the host.

The curve: with 100 to 20,000 extra sleeping processes (real ones, /bin/sleep, in a memory
cgroup of their own, which is also the cgroup dbguard watches, so under pressure every one of
them is in its scope), three cycles are timed in one process: the daemon's whole cycle at
rest (Daemon.cycle() in dry run, no database: pressure reading, process table, classify,
verdicts, decide, metrics), the same cycle under pressure (the table reads the scope afresh:
Sensor.snapshot(fresh=True) + assess + Policy.decide), and, for comparison, what every cycle
cost before the table was kept across cycles (read_procs() of all of /proc + classify()).
Then 500 PostgreSQL backends (a throwaway cluster, 500 open connections), where the whole
user-space cycle with SQL collect is timed as well.
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
    with MemoryCgroup(8192 * MiB) as cg:
        p = subprocess.Popen([sys.executable, "-c", SPAWNER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, preexec_fn=cg.preexec())
        try:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"could not spawn {n} sleeping processes")
            yield cg
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
    from dbguard.watch import build_policies
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
                build_policies(cfg, sensor.watches, sensor.db_configs, True)
                policy, state = sensor.watches[0].policy, PolicyState()

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


CURVE = (100, 1000, 2000, 5000, 10000, 20000)
QUICK_CURVE = (100, 1000, 5000)


def dry_run_daemon(cgroup: str, tmp: str):
    """A Daemon in dry run watching `cgroup` alone (no database, no BPF, no metrics port), its
    state and audit in `tmp`, opened."""
    from dbguard import config
    from dbguard.daemon import Daemon

    cfg = config.from_dict({"general": {"state_dir": tmp, "dry_run": True, "discover": False},
                            "pressure": {"cgroup": cgroup}, "bpf": {"enabled": False},
                            "audit": {"path": os.path.join(tmp, "audit.jsonl")}, "metrics": {"listen": ""}})
    d = Daemon(cfg, dry_run=True)
    d.open()
    return d


def _daemon_cycles(cg, n: int, log) -> list[dict]:
    from dbguard.assess import assess

    with tempfile.TemporaryDirectory(prefix="dbguard-bench-scale-") as tmp:
        d = dry_run_daemon(str(cg.path), tmp)
        try:
            for _ in range(3):
                d.cycle()       # births read; the first sweep share taken

            def at_rest():
                return len(d.cycle()[0].snap.procs)

            def pressed():
                w, = d.watches
                reading = w.monitor.read()
                a = assess(reading, d.cfg.pressure, w.state.levels, time.time())
                snap = d.sensor.snapshot(reading, fresh=True)
                w.policy.decide(snap, a, w.state)
                return len(snap.procs)
            rows = [_row(f"+{n:,}: daemon cycle at rest", at_rest,
                         "Daemon.cycle(): process table refreshed by what changed, the largest, a slow sweep"),
                    _row(f"+{n:,}: cycle under pressure", pressed,
                         "the watched scope (holding the sleepers) read afresh, assess, decide")]
            rows[-1]["reads"] = d.sensor.table.reads
            return rows
        finally:
            d.sensor.close()


def run(quick: bool = False, log=print) -> dict:
    rows = [_row("this host as it is: full read", _cycle, "read_procs + classify")]
    log(f"host: {rows[-1]['wall_ms']['median']:.1f} ms for {rows[-1]['processes']} processes")
    curve = []
    for n in (QUICK_CURVE if quick else CURVE):
        with sleepers(n) as cg:
            full = _row(f"+{n:,}: full read (before)", _cycle, "read_procs + classify of all of /proc")
            rest, pressed = _daemon_cycles(cg, n, log)
        rows += [rest, pressed, full]
        curve.append({"extra": n, "processes": rest["processes"], "rest_cpu_ms": rest["cpu_ms"]["median"],
                      "rest_wall_ms": rest["wall_ms"]["median"], "pressed_cpu_ms": pressed["cpu_ms"]["median"],
                      "pressed_wall_ms": pressed["wall_ms"]["median"], "full_cpu_ms": full["cpu_ms"]["median"],
                      "full_wall_ms": full["wall_ms"]["median"]})
        log(f"+{n}: at rest {rest['cpu_ms']['median']:.1f} ms CPU, under pressure {pressed['cpu_ms']['median']:.1f} ms, "
            f"full read {full['cpu_ms']['median']:.1f} ms ({rest['processes']} processes)")
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
            "rows": rows, "curve": curve}
