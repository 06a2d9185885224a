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
import threading
import time

import psycopg
import pytest

from dbguard.errors import DbguardError
from lab.launcher import DbguardRun, audit_records, base_config
from lab.pgbouncer import PgBouncer
from lab.pgcluster import PgCluster

MiB = 1024**2
LIMIT = 600 * MiB
POOL = 8

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]

SORT = ("SELECT count(*) FROM (SELECT g, md5(g::text) AS m FROM generate_series(1, 350000) g "
        "ORDER BY m) s")


class Clients:
    def __init__(self, dsn: str, n: int):
        self.dsn, self.ok, self.errors = dsn, 0, []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as c:
                while not self.done.is_set():
                    c.execute(SORT).fetchone()
                    self.ok += 1
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}"[:300])

    def start(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)


class PoolSampler(threading.Thread):
    def __init__(self, b: PgBouncer):
        super().__init__(daemon=True)
        self.b, self.seen = b, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.3):
            with contextlib.suppress(Exception):
                self.seen.append(int(self.b.config("default_pool_size")))


def test_pool_sizes_go_down_under_session_pressure_and_back(pgbouncer_host, make_cgroup, tmp_path):
    cg = make_cgroup(LIMIT)
    pg = PgCluster(settings={"shared_buffers": "64MB", "work_mem": "48MB", "max_connections": "40"},
                   cgroup=cg).start()
    daemon = None
    try:
        with PgBouncer(pg, pool_size=POOL) as b:
            sampler = PoolSampler(b)
            cfg = base_config(tmp_path, cg.path)
            cfg["general"]["interval"] = 0.2
            cfg["pressure"].update(min_dwell=2.0, warn_usage=0.5, high_usage=0.9, critical_usage=0.96,
                                   warn_psi_some=0.0)
            cfg["databases"] = [{"name": "pg", "kind": "postgresql", "dsn": pg.dsn, "shrink_steps": 0}]
            cfg["poolers"] = [{"name": "pgb", "kind": "pgbouncer", "dsn": b.admin_dsn, "pool_floor": 2}]
            daemon = DbguardRun(tmp_path, cfg)

            def diag() -> str:
                rows = [f"{x.get('action')} {x.get('target')} {x.get('level')}: {x.get('result')}"
                        for x in audit_records(daemon.audit_path) if x.get("action") != "set_oom_score_adj"]
                return ("audit:\n  " + "\n  ".join(rows[-30:]) + f"\npool sizes seen: {sampler.seen[-60:]}"
                        f"\ncgroup usage {cg.usage() // MiB} MiB\ndbguard output:\n{daemon.output(2000)}")
            try:
                daemon.wait_protecting(settle=1)
            except DbguardError as e:
                pytest.fail(f"{e}\n{diag()}")
            sampler.start()
            clients = Clients(b.dsn("app"), 12).start()
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
            story = diag() + f"\nclients: {clients.ok} queries, errors {clients.errors[:3]}"
            print(story)
            audit = audit_records(daemon.audit_path)
            running = daemon.running()
    finally:
        if daemon is not None:
            with contextlib.suppress(DbguardError):
                daemon.stop(30)
        pg.destroy()

    assert running, story
    assert lowered, f"the pool size never went down\n{story}"
    assert end == POOL, f"the pool size is {end}, not back at {POOL}\n{story}"
    shrinks = [x for x in audit if x.get("action") == "shrink_cache" and x.get("cache") == "pgb"]
    assert shrinks and all(x["ok"] and "default_pool_size" in x["result"] for x in shrinks), story
    assert not any(x.get("action") in ("cancel_query", "terminate_session", "kill") for x in audit), story
    assert clients.errors == [] and clients.ok > 0, story
    assert cg.oom_kills() == 0, story
