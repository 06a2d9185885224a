"""A memcached cache, PostgreSQL and hogs in one memory cgroup: dbguard makes memcached give its
memory back to the kernel instead of anyone killing it, and gives the limit back afterwards.

memcached (-m 256, filled with 240 MiB of 20 kB values), PostgreSQL (shared_buffers 128 MB, a
read load) and three 110 MiB hogs share a 600 MiB memory cgroup, as in test_redis_pressure.py.
With `dbguard run` watching the cgroup: cache_memlimit goes down in steps and memcached's slab
pages go back to the kernel (what it holds, `stats slabs` total_malloced, and its RSS in /proc
both fall: what really happens to it), before any kill; nothing of memcached or PostgreSQL is
killed, the kernel never strikes, dbguard keeps running; once the hogs are gone
cache_memlimit is back at 256 MiB (memcached's own stats).
"""
from __future__ import annotations

import contextlib
import time

import pytest

from dbguard.errors import DbguardError
from lab.cachelab import (HOG, PgReads, Sampler, assert_kept, end_hogs, guard_config, protecting, start_hogs,
                          story, wait_for)
from lab.launcher import DbguardRun, audit_records
from lab.memcached import Memcached
from lab.pgcluster import PgCluster
from lab.procs import rss

MiB = 1024**2
LIMIT = 600 * MiB
CONFIGURED = 256 * MiB
FLOOR = 64 * MiB

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


def test_with_dbguard_memcached_hands_memory_back_and_gets_its_limit_back(memcached_host, postgresql_host,
                                                                          make_cgroup, procs, tmp_path):
    cg = make_cgroup(2048 * MiB)
    pg = PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg).start()
    m = None
    daemon = None
    try:
        pg.pgbench_init(5)
        m = Memcached(limit_mib=CONFIGURED // MiB, cgroup=cg).start()
        m.fill(240 * MiB)
        postmaster, mc_pid = pg.postmaster_pid(), m.pid
        held0, rss0 = m.stats("slabs")["total_malloced"], rss(m.pid)
        sampler = Sampler(lambda: (m.stats()["limit_maxbytes"], m.stats("slabs")["total_malloced"], rss(m.pid)))
        reads = PgReads(pg.dsn)
        cg.set_limit(LIMIT)
        daemon = DbguardRun(tmp_path, guard_config(tmp_path, cg, pg.dsn, {"name": "mc", "kind": "memcached",
                                                                          "url": m.socket, "floor": FLOOR}))

        def diag() -> str:
            lows = sorted({s[0] // MiB for s in sampler.seen})
            return story(daemon, f"limits seen (MiB): {lows}; held/RSS at the start {held0 // MiB}/{rss0 // MiB} MiB, "
                         f"lowest {min((s[1] for s in sampler.seen), default=0) // MiB}/"
                         f"{min((s[2] for s in sampler.seen), default=0) // MiB} MiB",
                         f"cgroup usage {cg.usage() // MiB} MiB")
        protecting(daemon, diag)
        sampler.start()
        reads.start()
        try:
            hogs = start_hogs(procs, cg)
            wait_for(lambda: any(s[0] < CONFIGURED for s in sampler.seen), 30, "a lower cache_memlimit", diag)
            wait_for(lambda: all(h.poll() is not None or rss(h.pid) >= HOG - 5 * MiB for h in hogs), 60,
                     "the hogs grown or killed", diag)
            time.sleep(3)
            end_hogs(hogs)
            wait_for(lambda: m.stats()["limit_maxbytes"] == CONFIGURED, 90, "cache_memlimit back at 256 MiB", diag)
            time.sleep(0.5)
        finally:
            sampler.done.set()
            reads.done.set()
        running = daemon.running()
        audit = audit_records(daemon.audit_path)
        told = diag() + f"\npostgres reads {reads.ok}"
        print(told)

        shrinks = assert_kept(told, audit, running=running, oom_kills=cg.oom_kills(), cache="mc", server=m, pg=pg,
                              postmaster=postmaster)
        assert m.pid == mc_pid
        lowest = min(s[0] for s in sampler.seen)
        assert FLOOR <= lowest < CONFIGURED, told
        # what really happens to memcached: its slab pages went back to the kernel, by its books and by the kernel's
        assert any("slab page(s) handed back" in x["result"] for x in shrinks), told
        assert min(s[1] for s in sampler.seen) <= held0 - (CONFIGURED - lowest) // 2, told
        assert min(s[2] for s in sampler.seen) <= rss0 - (CONFIGURED - lowest) // 2, told
        assert m.stats()["limit_maxbytes"] == CONFIGURED
        assert reads.errors == [] and reads.ok > 0, f"PostgreSQL reads: {reads.ok} ok, errors {reads.errors}"
    finally:
        if daemon is not None:
            with contextlib.suppress(DbguardError):
                daemon.stop(30)
        procs.close()
        if m is not None:
            m.stop()
        pg.destroy()
