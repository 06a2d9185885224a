"""PgBouncer in front of PostgreSQL, the database's own sessions pressing its memory cgroup:
dbguard lowers the pool sizes through the admin console (fewer backends sort at once), and
puts them back when the pressure has passed; the clients going through PgBouncer see no error.

PostgreSQL (work_mem 48MB, in a 600 MiB memory cgroup) behind a PgBouncer with
default_pool_size 8 (transaction pooling); 12 clients through it each run a sort that takes
about work_mem. The warn mark is lowered to 50 % and the high mark left at 90 %, so the
sessions' memory brings warn (the pooler's answer) and never high (which would cancel them).
Pool sizes are read by psql on the admin console, sessions by pg_stat_activity.
"""
from __future__ import annotations

import contextlib
import time

import pytest

from dbguard.errors import DbguardError
from lab.cachelab import Sampler, protecting, story
from lab.launcher import DbguardRun, audit_records, base_config
from lab.pgbouncer import Clients, PgBouncer
from lab.pgcluster import PgCluster

MiB = 1024**2
LIMIT = 600 * MiB
POOL = 8

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]

SORT = ("SELECT count(*) FROM (SELECT g, md5(g::text) AS m FROM generate_series(1, 350000) g "
        "ORDER BY m) s")


def test_pool_sizes_go_down_under_session_pressure_and_back(pgbouncer_host, make_cgroup, tmp_path):
    cg = make_cgroup(LIMIT)
    pg = PgCluster(settings={"shared_buffers": "64MB", "work_mem": "48MB", "max_connections": "40"},
                   cgroup=cg).start()
    daemon = None
    try:
        with PgBouncer(pg, pool_size=POOL) as b:
            sampler = Sampler(lambda: int(b.config("default_pool_size")))
            cfg = base_config(tmp_path, cg.path)
            cfg["general"]["interval"] = 0.2
            cfg["pressure"].update(min_dwell=2.0, warn_usage=0.5, high_usage=0.9, critical_usage=0.96,
                                   warn_psi_some=0.0)
            cfg["databases"] = [{"name": "pg", "kind": "postgresql", "dsn": pg.dsn, "shrink_steps": 0}]
            cfg["poolers"] = [{"name": "pgb", "kind": "pgbouncer", "dsn": b.admin_dsn, "pool_floor": 2}]
            daemon = DbguardRun(tmp_path, cfg)

            def diag() -> str:
                return story(daemon, f"pool sizes seen: {sampler.seen[-60:]}", f"cgroup usage {cg.usage() // MiB} MiB")
            protecting(daemon, diag, settle=1)
            sampler.start()
            clients = Clients(b.dsn("app"), 12, SORT).start()
            deadline = time.monotonic() + 60
            while not any(s < POOL for s in sampler.seen) and time.monotonic() < deadline:
                time.sleep(0.2)
            lowered = any(s < POOL for s in sampler.seen)
            time.sleep(3)
            clients.stop()
            deadline = time.monotonic() + 60
            while int(b.config("default_pool_size")) != POOL and time.monotonic() < deadline:
                time.sleep(0.3)
            end = int(b.config("default_pool_size"))
            sampler.done.set()
            told = diag() + f"\nclients: {clients.ok} queries, errors {clients.errors[:3]}"
            print(told)
            audit = audit_records(daemon.audit_path)
            running = daemon.running()
    finally:
        if daemon is not None:
            with contextlib.suppress(DbguardError):
                daemon.stop(30)
        pg.destroy()

    assert running, told
    assert lowered, f"the pool size never went down\n{told}"
    assert end == POOL, f"the pool size is {end}, not back at {POOL}\n{told}"
    shrinks = [x for x in audit if x.get("action") == "shrink_cache" and x.get("cache") == "pgb"]
    assert shrinks and all(x["ok"] and "default_pool_size" in x["result"] for x in shrinks), told
    assert not any(x.get("action") in ("cancel_query", "terminate_session", "kill") for x in audit), told
    assert clients.errors == [] and clients.ok > 0, told
    assert cg.oom_kills() == 0, told
