"""A Redis cache in front of PostgreSQL under memory pressure: dbguard against the kernel default.

    sudo .venv/bin/python -m benchmarks.scenario_cache              # 3 runs per contender, ~10 min
    sudo .venv/bin/python -m benchmarks.scenario_cache --runs 1 --out /tmp/cache-smoke   # ~3 min; the record stays
    (make bench runs it too: benchmarks.run's extra "cache"; RESULTS.md shows its table)

PostgreSQL (shared_buffers 128 MB, pgbench scale 5), Redis (maxmemory 256 MiB, allkeys-lru,
filled with 240 MiB of 20 kB values) and three 110 MiB hogs share one 600 MiB memory cgroup.
An application reads through the cache (cache-aside: a miss reads the row range from
PostgreSQL and writes it back to Redis; a cache that does not answer sends every read to
PostgreSQL). Measured per phase: before the hogs, during (hogs alive), after (hogs gone):
the cache's hit rate, the application's reads per second, and PostgreSQL's queries per second.
Contenders: `none` (the kernel's OOM killer) and `dbguard` (dbguard run with the cache in
[[caches]]). Results: benchmarks/cache-results.json and benchmarks/CACHE-RESULTS.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from dbguard.errors import DbguardError
from lab import hog
from lab.cgroup import MemoryCgroup
from lab.cachelab import guard_config
from lab.launcher import DbguardRun, audit_records
from lab.pgcluster import PgCluster
from lab.pgoutput import count_crash_recoveries
from lab.procs import alive, stop_all
from lab.redis import RedisServer

from .record import Standalone, grouped, repeat
from .stats import median

HERE = Path(__file__).resolve().parent
MiB = 1024**2
LIMIT = 600 * MiB
MAXMEMORY = 256 * MiB
VALUE = 20_000
HOG = 110 * MiB
BEFORE, DURING, AFTER = 10.0, 25.0, 30.0
CONTENDERS = ("none", "dbguard")


class App(threading.Thread):
    """Cache-aside reads: GET a key; on a miss (or a cache that does not answer) read from
    PostgreSQL, then SET it back. Counted per second: hits, misses, cache errors, reads done."""

    def __init__(self, r: RedisServer, pg: PgCluster, keys: int):
        super().__init__(daemon=True)
        self.r, self.pg, self.keys = r, pg, keys
        self.done = threading.Event()
        self.events: list[tuple[float, str]] = []        # (time, hit|miss|down|dberror)

    def run(self) -> None:
        import random
        rng = random.Random(7)
        value = "v" * VALUE
        cache = None
        db = psycopg.connect(self.pg.dsn, autocommit=True)
        while not self.done.is_set():
            i = rng.randrange(self.keys)
            got, what = None, "miss"
            try:
                if cache is None:
                    cache = self.r.client(2)
                got = cache.call("GET", f"key:{i}")
                what = "hit" if got is not None else "miss"
            except Exception:
                what, cache = "down", None
            if got is None:
                try:
                    db.execute("SELECT sum(abalance) FROM pgbench_accounts WHERE aid BETWEEN %s AND %s",
                               (i * 20 % 500_000, i * 20 % 500_000 + 200)).fetchone()
                except Exception:
                    what = "dberror"
                    try:
                        db = psycopg.connect(self.pg.dsn, autocommit=True)
                    except Exception:
                        time.sleep(0.5)
                if cache is not None and what == "miss":
                    try:
                        cache.call("SET", f"key:{i}", value)
                    except Exception:
                        cache = None
                if what == "down":
                    time.sleep(0.002)
            self.events.append((time.monotonic(), what))


def phase(events, t0: float, t1: float) -> dict:
    seen = [w for t, w in events if t0 <= t < t1]
    n = len(seen) or 1
    hits = seen.count("hit")
    cache_reads = sum(1 for w in seen if w in ("hit", "miss"))
    db = sum(1 for w in seen if w in ("miss", "down"))
    return {"hit_rate": round(hits / cache_reads, 3) if cache_reads else 0.0,
            "reads_per_s": round(len(seen) / (t1 - t0), 1), "db_queries_per_s": round(db / (t1 - t0), 1),
            "cache_down_share": round(seen.count("down") / n, 3), "db_errors": seen.count("dberror")}


def one_run(contender: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="dbguard-bench-cache-") as work, MemoryCgroup(2048 * MiB) as cg:
        work = Path(work)
        pg = PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg).start()
        r = None
        daemon = None
        hogs = []
        try:
            pg.pgbench_init(5)
            r = RedisServer(maxmemory=MAXMEMORY, policy="allkeys-lru", cgroup=cg).start()
            keys = r.fill(240 * MiB, VALUE)
            postmaster, redis_pid = pg.postmaster_pid(), r.pid
            cg.set_limit(LIMIT)
            if contender == "dbguard":
                daemon = DbguardRun(work, guard_config(work, cg, pg.dsn, {"name": "app", "kind": "redis", "url": r.url,
                                                                          "floor": 64 * MiB}))
                daemon.wait_protecting(settle=2)
            app = App(r, pg, keys)
            app.start()
            t0 = time.monotonic()
            time.sleep(BEFORE)
            t1 = time.monotonic()
            for _ in range(3):
                hogs.append(hog.spawn(HOG, 5 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                      stdout=subprocess.DEVNULL))
                time.sleep(1.0)
            time.sleep(DURING - 3)
            t2 = time.monotonic()
            stop_all(hogs)
            time.sleep(AFTER)
            t3 = time.monotonic()
            app.done.set()
            app.join(10)
            audit = audit_records(work / "audit.jsonl") if daemon else []
            rec = {"contender": contender,
                   "before": phase(app.events, t0, t1), "during": phase(app.events, t1, t2),
                   "after": phase(app.events, t2, t3),
                   "redis_killed": not r.running() or r.pid != redis_pid,
                   "postgres_crash_recoveries": count_crash_recoveries(pg.log()),
                   "postmaster_alive": alive(postmaster), "kernel_oom_kills": cg.oom_kills(),
                   "maxmemory_end": r.maxmemory_now() if r.running() else None,
                   "cache_shrinks": sum(1 for x in audit if x.get("action") == "shrink_cache" and x.get("cache")),
                   "cache_grows": sum(1 for x in audit if x.get("action") in ("grow_cache", "restore_cache")
                                      and x.get("cache")),
                   "hogs_killed_by_dbguard": sum(1 for x in audit if x.get("action") == "kill" and x.get("ok"))}
            return rec
        finally:
            if daemon is not None:
                try:
                    daemon.stop(30)
                except DbguardError:
                    pass
            stop_all(hogs)
            if r is not None:
                r.stop()
            pg.destroy()


TITLE = "A Redis cache in front of PostgreSQL under memory pressure"


def body(data: dict) -> list[str]:
    """The report of one recorded run, below its title."""
    lines = [f"- Measured {data['when']}, git {data['git']}, `{data['command']}`; {data['runs']} run(s) per contender, "
             "interleaved; figures are medians over the runs.",
             "- PostgreSQL (shared_buffers 128 MB), Redis (maxmemory 256 MiB, allkeys-lru, 240 MiB of 20 kB values) "
             "and three 110 MiB hogs in one 600 MiB memory cgroup; the application reads through the cache "
             "(a miss or a cache that does not answer reads PostgreSQL, a miss is written back).",
             f"- Phases: before the hogs ({BEFORE:g} s), during (hogs alive, {DURING:g} s), after (hogs gone, "
             f"{AFTER:g} s).", "",
             "| contender | Redis killed | PG crash recoveries | kernel OOM kills | hit rate before / during / after | "
             "app reads/s before / during / after | PostgreSQL queries/s before / during / after | maxmemory at the end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, runs in grouped(data["results"], "contender", CONTENDERS):

        def m(ph, key):
            return median([x[ph][key] for x in runs])
        end = median([x["maxmemory_end"] for x in runs])
        lines.append(
            f"| {c} | {sum(x['redis_killed'] for x in runs)}/{len(runs)} | "
            f"{median([x['postgres_crash_recoveries'] for x in runs])} | {median([x['kernel_oom_kills'] for x in runs])} | "
            f"{m('before', 'hit_rate')} / {m('during', 'hit_rate')} / {m('after', 'hit_rate')} | "
            f"{m('before', 'reads_per_s')} / {m('during', 'reads_per_s')} / {m('after', 'reads_per_s')} | "
            f"{m('before', 'db_queries_per_s')} / {m('during', 'db_queries_per_s')} / {m('after', 'db_queries_per_s')} | "
            f"{'-' if end is None else f'{end // MiB} MiB'} |")
    lines += ["", "Hit rate: GETs that found the key over GETs answered (a cache that does not answer counts in "
              "neither); PostgreSQL queries/s: the application's reads that fell through to the database "
              "(misses and cache-down reads). Raw figures: [cache-results.json](cache-results.json).", ""]
    return lines


RECORD = Standalone("scenario_cache", TITLE, HERE / "cache-results.json", HERE / "CACHE-RESULTS.md", body)
section = RECORD.section


def _needs() -> None:
    from lab import require
    from lab.redis import require as redis_required
    require.memory_cgroups()
    require.postgresql()
    redis_required()


def main(argv: list[str] | None = None) -> int:
    return RECORD.main(argv, __doc__, _needs, lambda a: repeat(
        a.runs, CONTENDERS, one_run, json.dumps))


if __name__ == "__main__":
    sys.exit(main())
