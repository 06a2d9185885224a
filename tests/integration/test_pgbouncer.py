"""The PgBouncer adapter against a real PgBouncer in front of a real PostgreSQL, both started by
the suite (lab.pgbouncer, lab.pgcluster), with 10 clients through it running a query back to
back: the pool goes down 8 -> 6 -> 4 -> 2 a step at a time, each step waiting for the last to
take effect as the policy does (`held`), and back to 8; after each step down the server
connections are at the new size (SHOW POOLS, read by psql: not dbguard's client), and every
client query succeeds throughout. How long clients waited is printed (and recorded by
benchmarks/giveback.py), never asserted on time.
"""
from __future__ import annotations

import statistics
import time

import pytest

from dbguard import config
from dbguard.caches.pgbouncer import PgBouncer as Adapter
from dbguard.model import Status
from lab.pgbouncer import Clients, PgBouncer
from lab.pgcluster import PgCluster

pytestmark = [pytest.mark.db, pytest.mark.root]

POOL, FLOOR, CLIENTS = 8, 2, 10
QUERY = "SELECT count(*) FROM generate_series(1, 300000)"


def adapter(b: PgBouncer, tmp_path) -> Adapter:
    cfg = config.from_dict({"poolers": [{"kind": "pgbouncer", "name": "pgb", "dsn": b.admin_dsn,
                                         "pool_floor": FLOOR}]})
    return Adapter(cfg.poolers[0], str(tmp_path / "state"))


def server_connections(b: PgBouncer) -> int:
    return sum(int(p[k]) for p in b.show("POOLS") if p["database"] == "app"
               for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


def wait(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{what} not within {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_pool_down_a_step_at_a_time_and_back_with_no_client_error(pgbouncer_host, tmp_path):
    pg = PgCluster(settings={"max_connections": "40"}).start()
    try:
        with PgBouncer(pg, pool_size=POOL) as b, Clients(b.dsn("app"), CLIENTS, QUERY) as clients:
            a = adapter(b, tmp_path)
            wait(lambda: server_connections(b) == POOL, 20, f"{POOL} server connections under {CLIENTS} clients")
            assert a.collect().shrink_steps_max == 3
            marks, story = [time.monotonic()], []
            for step, size in ((1, 6), (2, 4), (3, 2)):
                held = wait(lambda: not a.collect().held, 30, f"the step before {step} taking effect")
                out = a.set_shrink_step(step)
                assert out.status is Status.DONE and "reconnect" in out.detail, out.detail
                assert b.config("default_pool_size") == str(size)
                took = wait(lambda: server_connections(b) <= size, 30, f"at most {size} server connections")
                marks.append(time.monotonic())
                story.append(f"step {step}: waited {held:.2f} s for the last, in effect after {took:.2f} s")
                assert not clients.errors, f"{story}\n{clients.errors[:3]}"
            assert {d["name"]: d["pool_size"] for d in b.show("DATABASES")}["app"] == str(FLOOR)
            time.sleep(3)
            steady = clients.latencies(marks[-1], time.monotonic())
            before = clients.ok
            for step in (2, 1, 0):
                assert a.set_shrink_step(step).status is Status.DONE
            assert b.config("default_pool_size") == str(POOL)
            wait(lambda: server_connections(b) == POOL, 20, f"{POOL} server connections again")
            wait(lambda: clients.ok > before + CLIENTS, 20, "every client served after the pool came back")
            clients.stop()
            during = clients.latencies(marks[0], marks[-1])
            first = clients.latencies(0, marks[0])
            print("\n".join(story), f"\nlatency s (median/max): before {statistics.median(first):.3f}/"
                  f"{max(first):.3f}, while stepping {statistics.median(during):.3f}/{max(during):.3f}, "
                  f"steady at {FLOOR} {statistics.median(steady):.3f}/{max(steady):.3f}; {clients.ok} queries")
            assert clients.errors == [], clients.errors[:3]
            assert not any(t.is_alive() for t in clients.threads), "a client is stuck in a query"
            assert not (tmp_path / "state" / "originals-pooler-pgb.json").exists()
            assert int(b.config("max_db_connections")) == 0         # left as the DBA set it
    finally:
        pg.destroy()
