"""A Redis cache, PostgreSQL and hogs in one memory cgroup: dbguard makes Redis give memory back
instead of anyone killing it, and gives it back afterwards.

Redis (maxmemory 256 MiB, allkeys-lru, filled to ~240 MiB of 20 kB values), PostgreSQL
(shared_buffers 128 MB, a read load) and three 110 MiB hogs share a 600 MiB memory cgroup.

- Without dbguard (the control) the kernel OOM killer strikes, and its victim is Redis (the
  largest process: the application loses its whole cache at once) or a PostgreSQL backend.
- With `dbguard run` watching the cgroup: Redis's maxmemory goes down in steps (CONFIG SET,
  Redis evicts and hands the pages back) before any kill; nothing of Redis or PostgreSQL is
  killed, the kernel never strikes, dbguard keeps running; the keys that survived read back
  right throughout; once the hogs are gone maxmemory is back at 256 MiB, the value redis.conf
  sets, read by redis-cli.
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import psycopg
import pytest

from dbguard.errors import DbguardError
from lab import hog
from lab.launcher import DbguardRun, audit_names, audit_records, base_config
from lab.pgcluster import PgCluster
from lab.pgoutput import count_crash_recoveries
from lab.procs import alive, rss
from lab.redis import CacheReader, RedisServer

MiB = 1024**2
LIMIT = 600 * MiB
MAXMEMORY = 256 * MiB
FLOOR = 64 * MiB
VALUE = 20_000
HOG = 110 * MiB

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


class PgReads(threading.Thread):
    """Range reads over pgbench_accounts on one connection: queries counted, errors kept."""

    def __init__(self, pg: PgCluster):
        super().__init__(daemon=True)
        self.pg, self.ok, self.errors = pg, 0, []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
                i = 0
                while not self.done.is_set():
                    conn.execute("SELECT sum(abalance) FROM pgbench_accounts WHERE aid BETWEEN %s AND %s",
                                 (i % 500_000, i % 500_000 + 2000)).fetchone()
                    self.ok += 1
                    i += 7919
                    time.sleep(0.01)
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}"[:300])


class MaxmemorySampler(threading.Thread):
    """maxmemory every 0.2 s through redis-cli (not dbguard's client): the oracle of its moves."""

    def __init__(self, r: RedisServer):
        super().__init__(daemon=True)
        self.r, self.seen = r, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            with contextlib.suppress(Exception):
                self.seen.append(self.r.maxmemory_now())


def _lab(make_cgroup):
    cg = make_cgroup(2048 * MiB)
    pg = PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg).start()
    pg.pgbench_init(5)
    r = RedisServer(maxmemory=MAXMEMORY, policy="allkeys-lru", cgroup=cg).start()
    keys = r.fill(240 * MiB, VALUE)
    return cg, pg, r, keys


def _hogs(procs, cg, n: int = 3) -> list:
    out = []
    for _ in range(n):
        out.append(procs.add(hog.spawn(HOG, 5 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                       stdout=subprocess.DEVNULL)))
        time.sleep(1.0)
    return out


def _wait(cond, timeout: float, what: str, diag=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s\n{diag()}")
        time.sleep(0.1)


def test_without_dbguard_the_kernel_kills_redis_or_a_backend(redis_host, postgresql_host, make_cgroup, procs):
    cg, pg, r, keys = _lab(make_cgroup)
    try:
        postmaster = pg.postmaster_pid()
        cg.set_limit(LIMIT)
        hogs = _hogs(procs, cg)
        _wait(lambda: cg.oom_kills() > 0 or all(rss(h.pid) >= HOG - 5 * MiB for h in hogs), 60, "the hogs grown")
        time.sleep(1)
        redis_killed = not r.running()
        crashed = count_crash_recoveries(pg.log()) > 0 or not alive(postmaster)
        assert cg.oom_kills() >= 1, f"no kernel OOM kill in the {LIMIT // MiB} MiB cgroup (usage {cg.usage() // MiB} MiB)"
        assert redis_killed or crashed, (f"the kernel killed neither Redis nor PostgreSQL this time; "
                                         f"redis running {r.running()}, pg log:\n{pg.log()[-1500:]}")
    finally:
        procs.close()
        r.stop()
        pg.destroy()


def test_with_dbguard_redis_gives_memory_back_and_gets_it_back(redis_host, postgresql_host, make_cgroup, procs,
                                                               tmp_path):
    cg, pg, r, keys = _lab(make_cgroup)
    daemon = None
    sampler = MaxmemorySampler(r)
    reads = PgReads(pg)
    try:
        postmaster, redis_pid = pg.postmaster_pid(), r.pid
        evicted_before = int(r.info("stats")["evicted_keys"])
        cg.set_limit(LIMIT)
        cfg = base_config(tmp_path, cg.path)
        cfg["general"]["interval"] = 0.2
        cfg["pressure"]["min_dwell"] = 2.0
        cfg["databases"] = [{"name": "pg", "kind": "postgresql", "dsn": pg.dsn}]
        cfg["caches"] = [{"name": "app", "kind": "redis", "url": r.url, "floor": FLOOR}]
        daemon = DbguardRun(tmp_path, cfg)

        def diag() -> str:
            rows = [f"{x.get('action')} {x.get('target')} {x.get('level')}: {x.get('result')}"
                    for x in audit_records(daemon.audit_path) if x.get("action") != "set_oom_score_adj"]
            return ("audit:\n  " + "\n  ".join(rows[-40:]) + f"\nmaxmemory seen: {sorted(set(sampler.seen))}"
                    f"\ncgroup usage {cg.usage() // MiB} MiB\ndbguard output:\n{daemon.output(2000)}")
        try:
            daemon.wait_protecting(settle=2)
        except DbguardError as e:
            pytest.fail(f"{e}\n{diag()}")
        sampler.start()
        reads.start()
        with CacheReader(r, keys, VALUE) as reader:
            hogs = _hogs(procs, cg)
            _wait(lambda: any(m < MAXMEMORY for m in sampler.seen), 30, "a lower maxmemory", diag)
            _wait(lambda: all(h.poll() is not None or rss(h.pid) >= HOG - 5 * MiB for h in hogs), 60,
                  "the hogs grown or killed", diag)
            time.sleep(3)
            during = (reader.hits, reader.misses)
            for h in hogs:
                if h.poll() is None:
                    h.kill()         # our own children: the pressure passes
                h.wait()
            _wait(lambda: r.maxmemory_now() == MAXMEMORY, 90, "maxmemory back at 256 MiB", diag)
            time.sleep(0.5)
        running = daemon.running()
        audit = audit_records(daemon.audit_path)
        story = diag() + f"\nreader: {reader.hits} hits, {reader.misses} misses; postgres reads {reads.ok}"
        print(story)
    finally:
        sampler.done.set()
        reads.done.set()
        if daemon is not None:
            with contextlib.suppress(DbguardError):
                daemon.stop(30)
        procs.close()

    try:
        assert running, f"dbguard exited\n{story}"
        assert cg.oom_kills() == 0, f"the kernel OOM killer struck {cg.oom_kills()} time(s)\n{story}"
        assert r.running() and r.pid == redis_pid, f"Redis was killed\n{story}"
        assert alive(postmaster) and count_crash_recoveries(pg.log()) == 0, f"PostgreSQL crashed\n{story}"
        assert not any(audit_names(x, redis_pid) or audit_names(x, postmaster) for x in audit
                       if "kill" in str(x.get("action"))), f"a kill names Redis or the postmaster\n{story}"
        shrinks = [x for x in audit if x.get("action") == "shrink_cache" and x.get("cache") == "app"]
        assert shrinks and all(x["ok"] and x["path"] == "user" for x in shrinks), story
        kills = [x for x in audit if "kill" in str(x.get("action"))]
        if kills:
            assert float(shrinks[0]["ts"]) < min(float(x["ts"]) for x in kills), f"a kill before the shrink\n{story}"
        lowest = min(sampler.seen)
        assert FLOOR <= lowest < MAXMEMORY, story
        assert int(r.info("stats")["evicted_keys"]) > evicted_before, f"Redis evicted nothing\n{story}"
        assert any(x.get("action") in ("grow_cache", "restore_cache") and x.get("cache") == "app" for x in audit)
        assert r.maxmemory_now() == MAXMEMORY
        # the keys that survived read back right throughout, and still do
        assert reader.errors == [] and reader.wrong == 0 and during[0] > 0, \
            f"reader: {reader.hits} hits, {reader.misses} misses, {reader.wrong} wrong, errors {reader.errors[:3]}"
        left = [k for k in r.cli("--scan", "--pattern", "key:*").split()]
        assert left and all(r.cli("GET", k) == "v" * VALUE for k in left[:200])
        assert reads.errors == [] and reads.ok > 0, f"PostgreSQL reads: {reads.ok} ok, errors {reads.errors}"
    finally:
        r.stop()
        pg.destroy()
