"""The shapes of issue #11 next to MariaDB: (1) the limit on a parent cgroup, mariadbd and the
hogs in unlimited sibling cgroups, no [pressure] cgroup; (2) dbguard's login refused. Each in
the benchmark's MariaDB scenario (six 150 MB hogs, a 512 MiB buffer pool kept full by range
reads, 1000 MB), which kills mariadbd without a guard (benchmarks/RESULTS.md, none: 0/3 survived).
mariadbd survives, no query fails, no kernel OOM kill, dbguard never acts on mariadbd.
"""
from __future__ import annotations

import contextlib
import json

import pytest

from lab.scenario import ScenarioEnv, dbguard_guard
from test_identity_shapes import family, score


def scenario(test):
    return pytest.mark.e2e(pytest.mark.root(pytest.mark.db(test)))


def _mariadb(guard, layout: str) -> dict:
    from benchmarks.contenders import Contender
    from benchmarks.record import Params
    from benchmarks.scenario_mariadb import moderate_hogs_mariadb
    c = Contender(name="dbguard", what="dbguard run", guard=lambda _c, env: guard(env), is_dbguard=True)
    return moderate_hogs_mariadb(c, Params(duration=24, warmup=6.0), print, layout=layout)


def _mariadb_guard(seen: dict, database: dict | None = None):
    @contextlib.contextmanager
    def dbguard(env: ScenarioEnv):
        with dbguard_guard(env, database=database) as run:
            mysqld = env.cluster.pid()
            yield
            seen["mysqld"] = mysqld
            seen["scores"] = {pid: score(pid) for pid in family(mysqld)}
            seen["running"] = run.running()
            seen["audit"] = run.audit()
            seen["output"] = run.output(6000)
    return dbguard


def assert_mariadb_protected(rec: dict, seen: dict) -> None:
    story = "\nrecord:\n" + json.dumps({k: v for k, v in rec.items() if k not in ("samples", "tps_progress")},
                                       default=str)[:6000] + "\ndbguard output:\n" + seen.get("output", "")[-3000:]
    assert rec["db_survived"] and not rec["db_deaths"] and rec["db_restarts"] == 0, "mariadbd did not survive" + story
    assert rec["crash_recoveries"] == 0 and rec["tx_failed"] == 0 and rec["sessions_lost"] == 0, story
    assert rec["kernel_oom_kills"] == 0, "the kernel OOM killer acted" + story
    assert rec["hogs_killed"] >= 1 and seen.get("running"), story
    family_pids = set(seen["scores"]) | {seen["mysqld"]}
    for r in seen["audit"]:
        if r.get("action") in ("kill", "set_oom_score_adj"):
            assert r.get("pid") not in family_pids, f"dbguard acted on mariadbd: {r}" + story
    kills = [r for r in seen["audit"] if r.get("action") == "kill" and r.get("path") in ("user", "bpf")]
    assert len(kills) >= rec["hogs_killed"], "a hog died without dbguard's kill record" + story
    assert all(s is not None and s <= 0 for s in seen["scores"].values()), seen["scores"]
    print({k: rec.get(k) for k in ("db_survived", "crash_recoveries", "sessions_lost", "tx_ok", "tx_failed",
                                   "hogs_killed", "kernel_oom_kills", "guard_kills", "oom_victims")})


@scenario
def test_mariadb_parent_limit_with_siblings(mariadb_host, scenario_host):
    seen: dict = {}
    rec = _mariadb(_mariadb_guard(seen), "parent")
    assert_mariadb_protected(rec, seen)


@scenario
def test_mariadb_login_refused(mariadb_host, scenario_host):
    seen: dict = {}
    rec = _mariadb(_mariadb_guard(seen, database={"user": "nosuchuser"}), "flat")
    assert_mariadb_protected(rec, seen)
    assert "login refused" in seen["output"], seen["output"][-2000:]
