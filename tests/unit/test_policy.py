"""The pure policy: levels, hysteresis, graduated answers, kill choice and rate limits."""
from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard import config
from dbguard.model import (ActionKind, DbSession, DbStats, Level, MemoryReading, Proc, Role, Snapshot)
from dbguard.assess import LevelState, assess, judge
from dbguard.policy import Policy
from policy_driver import Driven

MiB = 1024 * 1024
LIMIT = 1000 * MiB
CG = "/lab"


def reading(used_mib: float, *, reclaimable_mib: float = 0, some: float = 0.0, full: float = 0.0,
            version: int = 1) -> MemoryReading:
    return MemoryReading(cgroup="/sys/fs/cgroup/memory/lab", cgroup_version=version,
                         usage_bytes=int(used_mib * MiB), limit_bytes=LIMIT, psi_some_avg10=some,
                         psi_full_avg10=full, reclaimable_bytes=int(reclaimable_mib * MiB))


def proc(pid: int, rss_mib: int, *, comm: str = "hog", exe: str = "/usr/bin/python3", ppid: int = 100,
         memcg: str = CG, adj: int = 0, start: int | None = None, uid: int = 1000) -> Proc:
    return Proc(pid=pid, start_time=start if start is not None else pid * 10, ppid=ppid, uid=uid, comm=comm,
                exe=exe, cmdline=comm, rss_bytes=rss_mib * MiB, memcg=memcg, oom_score_adj=adj)


def pg(step: int = 0, steps: int = 3, sessions: tuple[DbSession, ...] = (), up: bool = True) -> DbStats:
    return DbStats(name="main", kind="postgresql", up=up, server_pid=500, sessions=sessions,
                   shrink_step=step, shrink_steps_max=steps, cache_bytes=500 * MiB)


def snapshot(ts: float, mem: MemoryReading, procs: list[Proc], dbs: tuple[DbStats, ...] = (),
             roles: dict[int, Role] | None = None) -> Snapshot:
    roles = dict(roles or {})
    for p in procs:
        roles.setdefault(p.pid, Role.OTHER)
    return Snapshot(ts=ts, memory=mem, procs={p.pid: p for p in procs}, roles=roles, databases=dbs,
                    self_pid=999)


def policy(**over) -> Driven:
    data = {"databases": [{"kind": "postgresql", "name": "main", "dsn": "dbname=postgres"}],
            "pressure": {"min_dwell": 5.0}}
    for section, values in over.items():
        data.setdefault(section, {}).update(values)
    return Driven(Policy(config.from_dict(data), watched_memcg=CG))


def kinds(plan) -> list[str]:
    return [a.kind.value for a in plan.actions]


# --- levels ---------------------------------------------------------------------------------

def test_levels_follow_the_marks_and_ignore_page_cache():
    p = config.default().pressure
    assert judge(reading(500), p)[0] is Level.OK
    assert judge(reading(850), p)[0] is Level.WARN
    assert judge(reading(920), p)[0] is Level.HIGH
    assert judge(reading(980), p)[0] is Level.CRITICAL
    # A cgroup at its limit full of inactive page cache is not in trouble.
    assert judge(reading(995, reclaimable_mib=600), p)[0] is Level.OK


def test_host_wide_psi_on_cgroup_v1_never_justifies_killing():
    p = config.default().pressure
    lvl, why = judge(reading(100, some=50, full=50, version=1), p)
    assert lvl is Level.WARN and "host-wide" in why
    assert judge(reading(100, full=50, version=2), p)[0] is Level.HIGH


def test_hysteresis_and_dwell_hold_a_level_then_let_it_go():
    p, t = config.default().pressure, LevelState()
    assert assess(reading(920), p, t, 0).level is Level.HIGH
    assert assess(reading(880), p, t, 1).level is Level.HIGH, "within hysteresis (0.05) of the high mark"
    assert assess(reading(500), p, t, 2).level is Level.HIGH, "min_dwell (5 s) not passed"
    assert assess(reading(500), p, t, 6.5).level is Level.OK
    assert assess(reading(990), p, t, 7).level is Level.CRITICAL, "up at once"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=40))
def test_the_level_never_falls_below_what_the_reading_justifies(usages):
    t = LevelState()
    p = config.default().pressure
    for i, u in enumerate(usages):
        a = assess(reading(u), p, t, float(i))
        assert a.level >= judge(reading(u), p)[0] and a.level == t.level


# --- graduated answers ---------------------------------------------------------------------

def test_warn_shrinks_caches_one_step_at_a_time_and_ok_grows_them_back_after_dwell():
    pol = policy()
    plan = pol.decide(snapshot(0, reading(850), [], (pg(0),)))
    assert plan.level is Level.WARN
    shrink = [a for a in plan.actions if a.kind is ActionKind.SHRINK_CACHE]
    assert [a.value for a in shrink] == [1]
    assert not any(a.kind is ActionKind.SHRINK_CACHE for a in pol.decide(snapshot(1, reading(850), [], (pg(1),))).actions), \
        "one step per min_dwell at warn"
    assert [a.value for a in pol.decide(snapshot(6, reading(850), [], (pg(1),))).actions
            if a.kind is ActionKind.SHRINK_CACHE] == [2]
    assert pol.decide(snapshot(8, reading(300), [], (pg(2),))).level is Level.WARN, "dwell"
    plan = pol.decide(snapshot(12, reading(300), [], (pg(2),)))
    assert plan.level is Level.OK
    assert [(a.kind, a.value) for a in plan.actions] == [(ActionKind.GROW_CACHE, 1)]
    assert not pol.decide(snapshot(14, reading(300), [], (pg(1),))).actions, "one step per min_dwell"
    plan = pol.decide(snapshot(18, reading(300), [], (pg(1),)))
    assert [(a.kind, a.value) for a in plan.actions] == [(ActionKind.GROW_CACHE, 0)]


def test_a_level_held_only_by_dwell_shrinks_nothing():
    pol = policy()
    assert [a.value for a in pol.decide(snapshot(0, reading(850), [], (pg(0),))).actions] == [1]
    pol.decide(snapshot(3, reading(850), [], (pg(1),)))
    plan = pol.decide(snapshot(6, reading(350), [], (pg(1),)))
    assert plan.level is Level.WARN, "held for min_dwell"
    assert "shrink_cache" not in kinds(plan), "the pressure has gone: a shrink now costs the cache for nothing"
    assert [a.value for a in pol.decide(snapshot(7, reading(850), [], (pg(1),))).actions] == [2], \
        "pressure back: shrinking resumes"


def test_grows_back_only_when_the_grown_cache_stays_under_the_warn_mark():
    pol = policy()
    pool = dataclasses.replace(pg(2), kind="mysql", grow_bytes=128 * MiB)
    pol.decide(snapshot(0, reading(850), [], (pool,)))
    # warn 80 % - hysteresis 5 % = 750 MiB: 650 + 128 would cross it and shrink again.
    plan = pol.decide(snapshot(10, reading(650), [], (pool,)))
    assert plan.level is Level.OK and "grow_cache" not in kinds(plan)
    assert [t for t, _ in plan.deferred] == ["mysql main"] and "would bring unreclaimable usage to 78%" in plan.deferred[0][1]
    plan = pol.decide(snapshot(11, reading(600), [], (pool,)))
    assert [(a.kind, a.value) for a in plan.actions] == [(ActionKind.GROW_CACHE, 1)] and not plan.deferred


def test_no_cache_step_while_a_resize_runs_and_no_grow_soon_after_the_server_shrank_itself():
    """The adapter reports the facts (resize_in_progress, self_shrunk_ago); the pacing is decided here."""
    pol = policy()
    pool = dataclasses.replace(pg(1), kind="mysql", resize_in_progress=True)
    plan = pol.decide(snapshot(0, reading(850), [], (pool,)))
    assert plan.level is Level.WARN and "shrink_cache" not in kinds(plan)
    assert plan.deferred == (("mysql main", "a cache resize is still in progress; the next step waits for it"),)
    plan = pol.decide(snapshot(1, reading(850), [], (dataclasses.replace(pool, resize_in_progress=False),)))
    assert [(a.kind, a.value) for a in plan.actions] == [(ActionKind.SHRINK_CACHE, 2)], "resize over: shrinking goes on"

    pol = policy()
    shrunk = dataclasses.replace(pg(2), kind="mysql", self_shrunk_ago=59.0)
    plan = pol.decide(snapshot(10, reading(300), [], (shrunk,)))
    assert plan.level is Level.OK and "grow_cache" not in kinds(plan)
    assert "the server shrank its cache itself 59s ago; not growing it back before 60s" in plan.deferred[0][1]
    plan = pol.decide(snapshot(11, reading(300), [], (dataclasses.replace(shrunk, self_shrunk_ago=60.0),)))
    assert [(a.kind, a.value) for a in plan.actions] == [(ActionKind.GROW_CACHE, 1)], "one step, after the hold-off"


def test_never_shrinks_past_the_floor_nor_a_database_that_is_down():
    pol = policy()
    assert "shrink_cache" not in kinds(pol.decide(snapshot(0, reading(990), [], (pg(3, 3),))))
    assert "shrink_cache" not in kinds(pol.decide(snapshot(10, reading(990), [], (pg(0, 3, up=False),))))


def test_runaway_session_is_cancelled_then_terminated_by_sql():
    def sessions(age: float):     # the same statement, `age` s after it started
        return (DbSession(pid=777, kind="client backend", state="active", memory_bytes=300 * MiB, age_seconds=age),
                DbSession(pid=778, kind="client backend", state="active", memory_bytes=10 * MiB, age_seconds=age))
    pol = policy()
    plan = pol.decide(snapshot(0, reading(920), [], (pg(3, 3, sessions=sessions(20)),)))
    assert [(a.kind, a.pid) for a in plan.actions if a.pid] == [(ActionKind.CANCEL_QUERY, 777)]
    assert not [a for a in pol.decide(snapshot(2, reading(920), [], (pg(3, 3, sessions=sessions(22)),))).actions
                if a.pid], "waits terminate_after"
    plan = pol.decide(snapshot(6, reading(920), [], (pg(3, 3, sessions=sessions(26)),)))
    assert [(a.kind, a.pid) for a in plan.actions if a.pid] == [(ActionKind.TERMINATE_SESSION, 777)]


def test_idle_sessions_closed_at_warn_only_when_configured():
    idle = DbSession(pid=40, kind="client backend", state="idle", age_seconds=600)
    assert "terminate_session" not in kinds(policy().decide(snapshot(0, reading(850), [], (pg(3, 3, (idle,)),))))
    data = {"databases": [{"kind": "postgresql", "name": "main", "dsn": "", "close_idle_after": 300}]}
    pol = Driven(Policy(config.from_dict(data), watched_memcg=CG))
    plan = pol.decide(snapshot(0, reading(850), [], (pg(3, 3, (idle,)),)))
    assert [(a.kind, a.pid) for a in plan.actions] == [(ActionKind.TERMINATE_SESSION, 40)]


# --- kills -----------------------------------------------------------------------------------

def test_high_kills_largest_candidates_until_under_the_mark_never_a_database_process():
    procs = [proc(10, 150), proc(11, 120), proc(12, 40),
             proc(500, 400, comm="postgres", exe="/usr/lib/postgresql/15/bin/postgres", ppid=1),
             proc(501, 450, comm="postgres", exe="/usr/lib/postgresql/15/bin/postgres", ppid=500),
             proc(1, 50, comm="init", ppid=0), proc(999, 60, comm="dbguard")]
    roles = {500: Role.POSTMASTER, 501: Role.PG_BACKEND, 1: Role.INIT, 999: Role.DBGUARD}
    pol = policy()
    plan = pol.decide(snapshot(0, reading(960), procs, (pg(3, 3),), roles))
    killed = [a.pid for a in plan.actions if a.kind is ActionKind.KILL]
    # 960 - (0.90 - 0.05) * 1000 = 110 MiB to free: the largest hog is enough.
    assert killed == [10]
    plan = pol.decide(snapshot(0.5, reading(995), procs, (pg(3, 3),), roles))
    assert [a.pid for a in plan.actions if a.kind is ActionKind.KILL] == [11, 12], \
        "145 MiB to free, 10 was planned already"


def test_kill_rate_limits_and_min_rss_and_outside_cgroup():
    procs = [proc(10, 150), proc(11, 20), proc(12, 300, memcg="/elsewhere")]
    pol = policy(kill={"min_interval": 1.0, "max_per_minute": 1})
    assert [a.pid for a in pol.decide(snapshot(0, reading(999), procs)).actions
            if a.kind is ActionKind.KILL] == [10]
    procs2 = [proc(13, 200)]
    assert not [a for a in pol.decide(snapshot(0.5, reading(999), procs2)).actions if a.kind is ActionKind.KILL], \
        "min_interval"
    assert not [a for a in pol.decide(snapshot(5, reading(999), procs2)).actions if a.kind is ActionKind.KILL], \
        "max_per_minute"
    assert [a.pid for a in pol.decide(snapshot(61, reading(999), procs2)).actions
            if a.kind is ActionKind.KILL] == [13]


def test_prefer_exe_first_protect_exe_never():
    procs = [proc(10, 300), proc(11, 50, exe="/opt/batch/job"), proc(12, 900, exe="/usr/sbin/sshd")]
    pol = policy(kill={"prefer_exe": ["/opt/batch/*"]})
    kills = [a.pid for a in pol.decide(snapshot(0, reading(999), procs)).actions if a.kind is ActionKind.KILL]
    assert kills[0] == 11 and 12 not in kills


def test_unknown_executable_is_never_a_candidate():
    pol = policy()
    assert not pol.candidates(snapshot(0, reading(999), [proc(10, 300, exe="")]))


def test_dry_run_marks_every_action():
    pol = Driven(Policy(config.from_dict({}), dry_run=True, watched_memcg=CG))
    plan = pol.decide(snapshot(0, reading(999), [proc(10, 300)]))
    assert plan.actions and all(a.dry_run for a in plan.actions)


def test_scores_raised_once_for_candidates_lowered_for_databases_only_when_permitted():
    procs = [proc(10, 300), proc(501, 100, comm="postgres", ppid=500, adj=0)]
    roles = {501: Role.PG_BACKEND}
    pol = policy()
    plan = pol.decide(snapshot(0, reading(100), procs, roles=roles))
    assert [(a.kind, a.pid, a.value) for a in plan.actions] == [(ActionKind.SET_OOM_SCORE_ADJ, 10, 500)]
    assert not pol.decide(snapshot(1, reading(100), procs, roles=roles)).actions, "asked once"
    pol = Driven(dataclasses.replace(policy().policy, can_lower_scores=True))
    plan = pol.decide(snapshot(0, reading(100), procs, roles=roles))
    assert (ActionKind.SET_OOM_SCORE_ADJ, 501, -900) in [(a.kind, a.pid, a.value) for a in plan.actions]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 60), st.integers(0, 600),
                          st.sampled_from(list(Role))), min_size=1, max_size=30, unique_by=lambda t: t[0]),
       st.floats(0, 1100))
def test_no_plan_ever_kills_a_process_that_must_never_be_signalled(table, used):
    procs = [proc(pid, rss) for pid, rss, _ in table]
    roles = {pid: role for pid, _, role in table}
    plan = policy().decide(snapshot(0, reading(used), procs, roles=roles))
    for a in plan.actions:
        if a.kind is ActionKind.KILL:
            assert not roles[a.pid].never_signalled and a.pid != 999


def test_a_level_held_by_dwell_kills_nothing_under_the_goal():
    pol = policy()
    procs = [proc(10, 150), proc(11, 120)]
    assert [a.pid for a in pol.decide(snapshot(0, reading(920), procs)).actions if a.kind is ActionKind.KILL] == [10]
    plan = pol.decide(snapshot(1, reading(700), [procs[1]]))
    assert plan.level is Level.HIGH, "held for min_dwell"
    assert not [a for a in plan.actions if a.kind is ActionKind.KILL], "usage is under the goal already"


def test_another_dbguard_is_never_a_candidate():
    from dbguard.policy.verdicts import another_dbguard
    others = [proc(60 + i, 300, comm="dbguard") for i in range(3)]
    others = [dataclasses.replace(p, cmdline=c) for p, c in zip(others, [
        "/usr/bin/python3 /usr/bin/dbguard run --config /etc/dbguard/b.toml",
        "/opt/venv/bin/python -m dbguard run", "python3 -m dbguard.cli run -c x.toml"])]
    assert all(another_dbguard(p) for p in others)
    assert not another_dbguard(dataclasses.replace(proc(70, 300), cmdline="/usr/bin/dbguard check"))
    assert not another_dbguard(dataclasses.replace(proc(71, 300), cmdline="python3 hog.py run"))
    pol = policy()
    assert not {p.pid for p in pol.candidates(snapshot(0, reading(999), others))}


def test_raised_scores_are_put_back_at_stop_where_they_are_still_ours():
    pol = policy()
    procs = [proc(80, 300, adj=0), proc(81, 300, adj=100)]
    plan = pol.decide(snapshot(0, reading(100), procs))
    assert [(a.pid, a.value) for a in plan.actions] == [(80, 500), (81, 500)]
    now = [dataclasses.replace(procs[0], oom_score_adj=500), dataclasses.replace(procs[1], oom_score_adj=700)]
    undo = pol.on_stop(snapshot(1, reading(100), now), pol.state)
    assert [(a.pid, a.value) for a in undo] == [(80, 0)], "81's score was changed by someone else since: left"


def test_a_newborn_is_scored_at_once_whatever_its_size_unless_protected():
    from dbguard.policy import PolicyState
    pol = Policy(config.from_dict({"kill": {"protect_exe": ["/usr/bin/backup"]}}))
    state = PolicyState()
    small = proc(500, 2)                         # far below kill.min_rss: raised all the same
    a = pol.newborn(small, self_pid=1, limit=None, state=state)
    assert a is not None and a.kind is ActionKind.SET_OOM_SCORE_ADJ and a.value == 500
    assert (a.pid, a.start_time) == (small.pid, small.start_time) and "scored at birth" in a.reason
    assert pol.newborn(small, self_pid=1, limit=None, state=state) is None, "asked once"
    assert state.scored[small.key] == (0, 500), "put back at stop like every raised score"
    assert pol.newborn(proc(501, 2, exe="/usr/bin/backup"), self_pid=1, limit=None, state=state) is None
    dry = Policy(config.from_dict({}), dry_run=True).newborn(proc(502, 2), self_pid=1, limit=None,
                                                             state=PolicyState())
    assert dry is not None and dry.dry_run
