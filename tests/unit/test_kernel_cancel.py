"""Which processes the kernel may cancel (SIGINT at a failing-reclaim streak): PostgreSQL client
backends by pg_stat_activity's backend_type and nothing else. The oracle is the backend_type
column of the rows (recorded from a real PostgreSQL 15, tests/fixtures/databases), not the
roles dbguard derives from it."""
from __future__ import annotations

import json
from pathlib import Path

from dbguard.classify import classify
from dbguard.databases.postgresql.stats import BACKEND_TYPE_ROLES, Reading, to_stats
from dbguard.model import DbSession, DbStats

from test_policy import policy, proc, reading, snapshot

MiB = 1024**2
PG_EXE = "/usr/lib/postgresql/15/bin/postgres"
POSTMASTER = 4242
FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures/databases/postgresql-15.json").read_text())


def _stats(activity: list[list]) -> DbStats:
    r = FIXTURE["reading"]
    return to_stats("main", Reading(activity=activity, settings=r["settings"], hit_ratio=r["hit_ratio"]),
                    server_pid=POSTMASTER, data_directory="/srv/pg", shrink_settings=("work_mem",), saved=None,
                    floor=MiB, steps=3, memory_of=lambda pid: 50 * MiB, notes={})


def _cancel(db: DbStats, *, up: bool = True) -> frozenset[int]:
    pids = sorted(set(db.roles) | {s.pid for s in db.sessions} | {POSTMASTER})
    procs = [proc(1, 10, comm="init", ppid=0, exe="/sbin/init"),
             proc(POSTMASTER, 300, comm="postgres", exe=PG_EXE, ppid=1)]
    procs += [proc(p, 60, comm="postgres", exe=PG_EXE, ppid=POSTMASTER) for p in pids if p != POSTMASTER]
    if not up:
        db = DbStats(name=db.name, kind=db.kind, up=False, server_pid=POSTMASTER)
    roles = classify({p.pid: p for p in procs}, (db,), self_pid=999)
    snap = snapshot(0, reading(500), procs, (db,), roles)
    return policy().kernel_view(snap).cancel


def test_the_recorded_servers_client_backends_and_only_they():
    activity = FIXTURE["reading"]["activity"]
    own = FIXTURE["oracle"]["own_pid"]
    expected = {row[0] for row in activity if row[1] == "client backend" and row[0] != own}
    assert len(expected) >= 2
    assert _cancel(_stats(activity)) == expected


def test_every_other_backend_type_and_the_postmaster_never():
    # One row per backend_type PostgreSQL 15 reports; pid 100 + its index.
    kinds = sorted(BACKEND_TYPE_ROLES)
    activity = [[100 + i, kind, "active", "app", "SELECT 1", 3.0, False, None, 1e9] for i, kind in enumerate(kinds)]
    got = _cancel(_stats(activity))
    assert got == {100 + kinds.index("client backend")}
    assert POSTMASTER not in got
    for kind in ("parallel worker", "walsender", "autovacuum worker", "background worker", "checkpointer",
                 "startup", "walwriter", "autovacuum launcher"):
        assert 100 + kinds.index(kind) not in got, kind


def test_a_database_without_sql_and_other_kinds_of_sessions_never():
    activity = [[101, "client backend", "active", "app", "SELECT 1", 3.0, False, None, 1e9]]
    assert _cancel(_stats(activity), up=False) == frozenset()
    maria = DbStats(name="main", kind="mysql", up=True, server_pid=POSTMASTER,
                    sessions=(DbSession(pid=101, kind="connection", state="active"),))
    assert _cancel(maria) == frozenset()
