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
import time

import pytest

from dbguard.errors import DbguardError
from lab.cachelab import (HOG, PgReads, Sampler, assert_kept, end_hogs, guard_config, protecting, start_hogs,
                          story, wait_for)
from lab.launcher import DbguardRun, audit_records
from lab.pgcluster import PgCluster
from lab.pgoutput import count_crash_recoveries
from lab.procs import alive, rss
from lab.redis import CacheReader, RedisServer

MiB = 1024**2
LIMIT = 600 * MiB
MAXMEMORY = 256 * MiB
FLOOR = 64 * MiB
VALUE = 20_000

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


def _lab(make_cgroup):
    cg = make_cgroup(2048 * MiB)
    pg = PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg).start()
    pg.pgbench_init(5)
    r = RedisServer(maxmemory=MAXMEMORY, policy="allkeys-lru", cgroup=cg).start()
    keys = r.fill(240 * MiB, VALUE)
    return cg, pg, r, keys


def test_without_dbguard_the_kernel_kills_redis_or_a_backend(redis_host, postgresql_host, make_cgroup, procs):
    cg, pg, r, keys = _lab(make_cgroup)
    try:
        postmaster = pg.postmaster_pid()
        cg.set_limit(LIMIT)
        hogs = start_hogs(procs, cg)
        wait_for(lambda: cg.oom_kills() > 0 or all(rss(h.pid) >= HOG - 5 * MiB for h in hogs), 60, "the hogs grown")
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
    sampler = Sampler(r.maxmemory_now)
    reads = PgReads(pg.dsn)
    try:
        postmaster, redis_pid = pg.postmaster_pid(), r.pid
        evicted_before = int(r.info("stats")["evicted_keys"])
        cg.set_limit(LIMIT)
        daemon = DbguardRun(tmp_path, guard_config(tmp_path, cg, pg.dsn, {"name": "app", "kind": "redis", "url": r.url,
                                                                          "floor": FLOOR}))

        def diag() -> str:
            return story(daemon, f"maxmemory seen: {sorted(set(sampler.seen))}", f"cgroup usage {cg.usage() // MiB} MiB")
        protecting(daemon, diag)
        sampler.start()
        reads.start()
        with CacheReader(r, keys, VALUE) as reader:
            hogs = start_hogs(procs, cg)
            wait_for(lambda: any(m < MAXMEMORY for m in sampler.seen), 30, "a lower maxmemory", diag)
            wait_for(lambda: all(h.poll() is not None or rss(h.pid) >= HOG - 5 * MiB for h in hogs), 60,
                     "the hogs grown or killed", diag)
            time.sleep(3)
            during = (reader.hits, reader.misses)
            end_hogs(hogs)
            wait_for(lambda: r.maxmemory_now() == MAXMEMORY, 90, "maxmemory back at 256 MiB", diag)
            time.sleep(0.5)
        running = daemon.running()
        audit = audit_records(daemon.audit_path)
        told = diag() + f"\nreader: {reader.hits} hits, {reader.misses} misses; postgres reads {reads.ok}"
        print(told)
    finally:
        sampler.done.set()
        reads.done.set()
        if daemon is not None:
            with contextlib.suppress(DbguardError):
                daemon.stop(30)
        procs.close()

    try:
        assert_kept(told, audit, running=running, oom_kills=cg.oom_kills(), cache="app", server=r, pg=pg,
                    postmaster=postmaster)
        assert r.pid == redis_pid, f"Redis was restarted\n{told}"
        lowest = min(sampler.seen)
        assert FLOOR <= lowest < MAXMEMORY, told
        assert int(r.info("stats")["evicted_keys"]) > evicted_before, f"Redis evicted nothing\n{told}"
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
