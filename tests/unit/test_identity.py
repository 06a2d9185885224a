"""Identity and the database family, as pure logic: the verdicts and scores of DB_CHILD and
DB_UNKNOWN processes, the executor's refusal to raise a shielded score, Tracker's memory and
the degraded lines. (Finding real servers: tests/integration/test_postgresql.py, test_mysql.py.)"""
from __future__ import annotations

from dbguard.act.executor import refusal
from dbguard.classify import classify
from dbguard.databases import identity
from dbguard.databases.identity import Found, Tracker
from dbguard.model import Action, ActionKind, DbStats, Role

from test_policy import pg, policy, proc, reading, snapshot

PG_EXE = "/usr/lib/postgresql/15/bin/postgres"


def _snap(dbs):
    procs = [proc(1, 10, comm="init", ppid=0, exe="/sbin/init"),
             proc(500, 400, comm="postgres", exe=PG_EXE, ppid=1),
             proc(501, 300, comm="postgres", exe=PG_EXE, ppid=500),
             proc(600, 200, comm="sh", exe="/bin/sh", ppid=501),              # COPY ... TO PROGRAM
             proc(601, 250, comm="gzip", exe="/usr/bin/gzip", ppid=600),
             proc(700, 300, comm="mariadbd", exe="/usr/sbin/mariadbd", ppid=1),  # nobody configured it
             proc(10, 150, ppid=1), proc(11, 120, ppid=1)]
    roles = classify({p.pid: p for p in procs}, dbs, self_pid=999)
    return snapshot(0, reading(990), procs, tuple(dbs), roles)


def test_family_and_unknown_servers_are_never_killed_nor_raised():
    for dbs in ([pg()], [DbStats(name="main", kind="postgresql", up=False, server_pid=None)]):
        snap = _snap(dbs)
        pol = policy()
        plan = pol.decide(snap)
        touched = {a.pid for a in plan.actions if a.kind in (ActionKind.KILL, ActionKind.SET_OOM_SCORE_ADJ)
                   and (a.kind is ActionKind.KILL or (a.value or 0) > 0)}
        assert touched <= {10, 11}, (dbs, touched)
        assert {10, 11} & {a.pid for a in plan.actions if a.kind is ActionKind.KILL}
        for pid in (500, 501, 600, 601, 700):
            v = pol.verdicts(snap)[pid]
            assert v.protected and not v.candidate, (pid, v)
        assert set(pol.kernel_view(snap).candidates) <= {10, 11}
    assert snap.roles[600] is Role.DB_CHILD and snap.roles[700] is Role.DB_UNKNOWN


def test_executor_never_raises_a_shielded_score():
    snap = _snap([pg()])
    for pid in (600, 700, 500):
        a = Action(ActionKind.SET_OOM_SCORE_ADJ, "test", pid=pid, start_time=pid * 10, value=500)
        assert "never raised" in (refusal(a, snap) or ""), pid
    a = Action(ActionKind.SET_OOM_SCORE_ADJ, "test", pid=600, start_time=6000, value=0)   # putting back: fine
    assert refusal(a, snap) is None
    a = Action(ActionKind.KILL, "test", pid=601, start_time=6010)
    assert "never signalled" in refusal(a, snap)


def test_tracker_keeps_a_live_server_and_pauses_between_failed_looks(monkeypatch):
    calls, now = [], [0.0]
    answers = [Found(None, why_not="nothing listens"), Found(4242, "/d", "lock file")]
    starts = {4242: 77}
    monkeypatch.setattr(identity, "live_start_time", lambda pid: starts.get(pid))
    t = Tracker(lambda: (calls.append(1), answers[min(len(calls) - 1, 1)])[1], retry=2.0, clock=lambda: now[0])
    assert not t.get().ok and len(calls) == 1
    assert not t.get().ok and len(calls) == 1          # within the pause: not looked for again
    now[0] = 2.5
    assert t.get().pid == 4242 and len(calls) == 2
    assert t.get().pid == 4242 and len(calls) == 2     # alive, same start time: kept
    starts[4242] = 78                                   # the pid was reused
    now[0] = 3.0
    t.get()
    assert len(calls) == 3


def test_degraded_lines_name_the_database_and_the_fix():
    stats = [DbStats(name="main", kind="postgresql", up=False, server_pid=None,
                     identity="cannot read /run/postgresql/.s.PGSQL.5432.lock: No such file or directory"),
             DbStats(name="ok", kind="mysql", up=True, server_pid=12)]
    lines = identity.degraded(stats)
    assert list(lines) == ["main"]
    assert lines["main"].startswith("postgresql main: server not identified (cannot read /run/postgresql/")
    assert "Fix: run dbguard as root" in lines["main"] and "\n" not in lines["main"]
