"""The shapes real hosts have (issue #11), each under the hogs scenario that kills PostgreSQL
without a guard: PostgreSQL survives with no crash recovery and no failed pgbench transaction,
there is no kernel OOM kill, every hog dbguard ended has its own audit record (path user or bpf),
dbguard is still running, and it never signalled a PostgreSQL process nor raised its score.

Shapes: (1) the limit on a parent cgroup, PostgreSQL and the hogs in unlimited sibling cgroups,
no [pressure] cgroup in the config (with its control run: no guard, PostgreSQL is killed);
(2) dbguard's login refused (the role does not exist); (3) a LOGIN-only role; (4) dbguard's own
backend stopped with SIGSTOP while pgbench's sessions go on.

The oracles are outside dbguard: pgbench's own counts, the server log, the cgroup's OOM
counter, pidfds on every PostgreSQL process, /proc/PID/oom_score_adj read by the test.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest

from dbguard.sense.procfs import read_procs
from lab.launcher import audit_names
from lab.pgoutput import server_log_victims
from lab.scenario import ScenarioEnv, ScenarioResult, dbguard_guard, run_pg_scenario


def scenario(test):
    return pytest.mark.e2e(pytest.mark.root(pytest.mark.db(test)))


def family(root: int) -> list[int]:
    """`root` and every process descended from it, from /proc now."""
    procs = read_procs()
    out, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, p in procs.items() if p.ppid == parent]
        out += kids
        frontier += kids
    return out


def score(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/oom_score_adj") as f:
            return int(f.read())
    except OSError:
        return None


def guarded(seen: dict, *, database: dict | None = None, before=None, after_start=None):
    """A scenario guard: `dbguard run` (lab.scenario.dbguard_guard) with the [[databases]] entry's
    keys replaced by `database`; `before(env)` runs first, `after_start(env, run)` once it
    protects (its return value, a callable, runs at the end). What the test checks afterwards
    goes into `seen`: whether dbguard still ran, and the scores of PostgreSQL's processes."""
    @contextlib.contextmanager
    def dbguard(env: ScenarioEnv):
        if before:
            before(env)
        with dbguard_guard(env, database=database) as run:
            undo = after_start(env, run) if after_start else None
            try:
                yield
                pm = env.cluster.postmaster_pid()
                seen["scores"] = {pid: score(pid) for pid in family(pm)}
                seen["running"] = run.running()
                # All of it: what dbguard said at start (a refused login) must not scroll out of
                # a window behind the kills' lines (it did, once BPF kills reported releases).
                seen["output"] = run.output(None)
            finally:
                if undo:
                    undo()
    return dbguard


def assert_protected(r: ScenarioResult, seen: dict) -> None:
    story = "\nwhat happened:\n" + r.summary() + "\naudit:\n" + "\n".join(json.dumps(a) for a in r.audit[-60:]) \
        + "\ndbguard output:\n" + seen.get("output", "")[-3000:]
    assert r.database_survived and not r.postmaster_restarted, "PostgreSQL did not survive" + story
    assert r.crash_recoveries == 0 and not server_log_victims(r.server_log_excerpt), "crash recovery" + story
    assert not r.postgres_deaths, f"PostgreSQL processes died: {r.postgres_deaths}" + story
    assert r.sessions_lost == 0 and r.transactions_failed == 0 and r.transactions_ok > 0, story
    assert r.oom_kills == 0, "the kernel OOM killer acted" + story
    assert seen.get("running"), "dbguard was not running at the end" + story
    assert r.hogs_killed, "no hog was killed: the scenario put no pressure on the cgroup?" + story
    kills = [rec for rec in r.audit if rec.get("action") == "kill" and rec.get("path") in ("user", "bpf")]
    for i in r.hogs_killed:
        assert any(audit_names(rec, r.hog_pids[i]) for rec in kills), f"hog {i} killed without dbguard's record" + story
    # dbguard never signalled anything but a hog, nor raised the score of anything but a hog.
    for rec in r.audit:
        if rec.get("action") in ("kill", "set_oom_score_adj") and rec.get("pid") is not None:
            assert rec["pid"] in r.hog_pids, f"dbguard acted on a process that is not a hog: {rec}" + story
    raised = {pid: s for pid, s in seen["scores"].items() if s is None or s > 0}
    assert not raised, f"PostgreSQL processes with a raised oom_score_adj: {raised}" + story
    print(r.summary().splitlines()[0], f"dbguard kills: {len(kills)}")


@scenario
def test_parent_limit_without_guard_kills_postgres(scenario_host):
    """The control run of shape (1): the layout alone, no guard. The kernel kills PostgreSQL."""
    r = run_pg_scenario("none", layout="parent", duration=35)
    story = "\nwhat happened:\n" + r.summary()
    assert r.oom_kills >= 1, "no kernel OOM kill in the parent cgroup" + story
    assert any("(postgres" in v for v in r.oom_victims), f"victims: {r.oom_victims}" + story
    assert r.crash_recoveries >= 1 and r.transactions_failed >= 1, story
    print(r.summary().splitlines()[0])


@scenario
def test_parent_limit_with_siblings_and_no_pressure_cgroup(scenario_host):
    seen: dict = {}
    r = run_pg_scenario(guarded(seen), layout="parent", duration=40)
    assert_protected(r, seen)
    start = next(rec for rec in r.audit if rec["action"] == "start")
    assert "tightest limit above the database's cgroup" in start["reason"], start


@scenario
def test_login_refused(scenario_host):
    seen: dict = {}

    @contextlib.contextmanager
    def dbguard(env: ScenarioEnv):
        with guarded(seen, database={"dsn": env.cluster.dsn_for("nosuchrole")})(env):
            yield
    r = run_pg_scenario(dbguard, duration=40)
    assert_protected(r, seen)
    assert "does not exist" in seen["output"], seen["output"][-2000:]


@scenario
def test_login_only_role(scenario_host):
    seen: dict = {}

    @contextlib.contextmanager
    def dbguard(env: ScenarioEnv):
        env.cluster.psql("CREATE ROLE loginonly LOGIN")
        with guarded(seen, database={"dsn": env.cluster.dsn_for("loginonly")})(env):
            yield
    r = run_pg_scenario(dbguard, duration=40)
    assert_protected(r, seen)


@scenario
def test_own_backend_stopped(scenario_host):
    """dbguard's backend is SIGSTOPped once dbguard protects: its queries hang (no statement
    timeout fires in a stopped process) while pgbench's sessions go on."""
    seen: dict = {}

    def stop_backend(env: ScenarioEnv, run):
        pids = env.cluster.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'dbguard'").split()
        assert pids, "dbguard has no backend to stop"
        for pid in map(int, pids):
            os.kill(pid, signal.SIGSTOP)
        seen["stopped"] = pids
        return lambda: [os.kill(int(pid), signal.SIGCONT) for pid in pids]

    r = run_pg_scenario(guarded(seen, after_start=stop_backend), duration=40)
    assert_protected(r, seen)
    # dbguard said its database stopped answering, yet kept the postmaster by fact
    assert "no answer within" in seen["output"] and "server pid" in seen["output"], seen["output"][-2000:]
