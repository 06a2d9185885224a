"""The PgBouncer adapter against a real PgBouncer in front of a real PostgreSQL, both started by
the suite (lab.pgbouncer, lab.pgcluster), with 10 clients through it running a query back to
back: the pool goes down 8 -> 6 -> 4 -> 2 a step at a time, each step waiting for the last to
take effect as the policy does (`held`), and back to 8; after each step down the server
connections are at the new size (SHOW POOLS, read by psql: not dbguard's client), and every
client query succeeds throughout. How long clients waited is printed (and recorded by
benchmarks/giveback.py), never asserted on time.

The two rules that keep a step from failing clients, each with real clients through a real
PgBouncer: a step down while a server connection is still logging in (held by a lock on
pg_authid, lab.pgbouncer.logins_held) is taken back, and the pool is not lowered further while
a client has waited a quarter of query_wait_timeout in PgBouncer's queue.
"""
from __future__ import annotations

import statistics
import time

import pytest

from dbguard import config
from dbguard.caches.pgbouncer import PgBouncer as Adapter
from dbguard.model import Status
from lab.pgbouncer import Clients, PgBouncer, logins_held
from lab.pgcluster import PgCluster

pytestmark = [pytest.mark.db, pytest.mark.root]

POOL, FLOOR, CLIENTS = 8, 2, 10
QUERY = "SELECT count(*) FROM generate_series(1, 300000)"


def adapter(b: PgBouncer, tmp_path, **entry) -> Adapter:
    cfg = config.from_dict({"poolers": [{"kind": "pgbouncer", "name": "pgb", "dsn": b.admin_dsn,
                                         "pool_floor": FLOOR, **entry}]})
    return Adapter(cfg.poolers[0], str(tmp_path / "state"))


def server_connections(b: PgBouncer) -> int:
    return sum(int(p[k]) for p in b.show("POOLS") if p["database"] == "app"
               for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


def pool(b: PgBouncer) -> dict[str, str]:
    """The pool of the database "app" (SHOW POOLS by psql); {} before its first client."""
    return next((p for p in b.show("POOLS") if p["database"] == "app"), {})


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


def test_a_step_down_while_a_server_login_runs_is_taken_back_and_no_client_sees_an_error(pgbouncer_host, tmp_path):
    """The pool went 8 -> 6 and back to 8 (pressure passed), and PgBouncer opens the two server
    connections back while new logins are held; pressure returns before they are in. A
    RECONNECT now would fail those logins and PgBouncer would turn the pool's clients away for
    server_login_retry: the step is taken back instead."""
    pg = PgCluster(settings={"max_connections": "40"}).start()
    try:
        with PgBouncer(pg, pool_size=POOL) as b, Clients(b.dsn("app"), CLIENTS, QUERY) as clients:
            a = adapter(b, tmp_path, timeout=1)
            wait(lambda: server_connections(b) == POOL, 20, f"{POOL} server connections under {CLIENTS} clients")
            assert a.set_shrink_step(1).status is Status.DONE
            wait(lambda: server_connections(b) <= 6, 30, "at most 6 server connections")
            with logins_held(pg):
                assert a.set_shrink_step(0).status is Status.DONE and b.config("default_pool_size") == str(POOL)
                wait(lambda: int(pool(b).get("sv_login", 0)) > 0, 10, "a server connection logging in")
                assert "logging in" in a.collect().held             # what the policy waits for
                before = clients.ok
                out = a.set_shrink_step(1)
                logging_in = int(pool(b).get("sv_login", 0))
                assert out.status is Status.REFUSED and "still logging in" in out.detail, out.detail
                assert b.config("default_pool_size") == str(POOL), "the lower pool size was not taken back"
                assert logging_in > 0, "the logins ended before the step was taken back: nothing was tested"
                assert clients.ok > before, "the open server connections stopped serving"
            assert a.collect().shrink_step == 0
            assert not (tmp_path / "state" / "originals-pooler-pgb.json").exists()
            wait(lambda: server_connections(b) == POOL, 20, f"{POOL} server connections once the logins are in")
            before = clients.ok
            wait(lambda: clients.ok > before + CLIENTS, 20, "every client served after the logins")
            clients.stop()
            assert clients.errors == [], clients.errors[:3]
    finally:
        pg.destroy()


def test_the_pool_stays_while_a_client_has_waited_a_quarter_of_query_wait_timeout(pgbouncer_host, tmp_path):
    """Both server connections of a pool of 2 run a 6 s statement and a third client waits in
    PgBouncer's queue; query_wait_timeout 8 s: once it has waited 2 s the adapter holds the
    next step (a smaller pool would make it wait past 8 s, and PgBouncer would then disconnect
    it with an error), and lets it go once nobody waits."""
    qwt, size = 8, 2
    pg = PgCluster(settings={"max_connections": "40"}).start()
    try:
        with PgBouncer(pg, pool_size=size, settings={"query_wait_timeout": str(qwt)}) as b:
            a = adapter(b, tmp_path, pool_floor=1)     # a step down exists: 2 -> 1
            assert a.collect().held == "" and a.collect().shrink_steps_max > 0
            with Clients(b.dsn("app"), size, "SELECT pg_sleep(6)", once=True) as busy:
                wait(lambda: int(pool(b).get("sv_active", 0)) == size, 10, f"{size} server connections busy")
                with Clients(b.dsn("app"), 1, "SELECT 1", once=True) as waiting:
                    wait(lambda: "waited" in a.collect().held, 10, "the hold for a client's wait")
                    seen = pool(b)                   # psql's view, not the adapter's
                    assert int(seen["cl_waiting"]) >= 1 and int(seen["maxwait"]) >= qwt // 4, seen
                    assert "query_wait_timeout (8 s)" in a.collect().held
                    waiting.stop()
                busy.stop()
            assert busy.errors == [] and waiting.errors == [], busy.errors + waiting.errors
            assert waiting.ok == 1 and busy.ok == size
            wait(lambda: a.collect().held == "", 10, "the hold let go once nobody waits")
    finally:
        pg.destroy()
