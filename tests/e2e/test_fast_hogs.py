"""Fast hogs, issue #19: six processes allocating at full speed next to a database in one
memory cgroup, round after round, with `dbguard run` (BPF on, its defaults) watching the cgroup.

The hogs are milliseconds old when the cgroup runs out: user space has not listed them yet.
Every round, on its own, must end with zero kernel OOM kills (the cgroup's memory.oom_control
counter and the kernel log: the kernel's own records), no crash recovery (the server's own
log), the server and its client load still up and dbguard still running. In every round where
the cgroup ran out (a failing-reclaim streak reached the kernel's gate: the BPF programs
counted a kill, or a stuck task with no victim left alive; their counters read from dbguard's
metrics), the kill that ended it was dbguard's in-kernel one (audit path "bpf"), often for a
database backend stuck in its own reclaim, which may not be killed. User space, woken by the
kernel's limit events, often ends a hog or two first, and then the cgroup never runs out in
that round: such a round proves the rest only. At least one round must see the kernel path.

PostgreSQL 15 (shared_buffers 400MB, pgbench -S running) in a cgroup limited to what it cannot
give back under that load (shared buffers, backends) plus three hogs' worth; MariaDB 10.11 (384
MiB buffer pool kept full by range reads) in one limited to what it holds under its load plus
three hogs' worth; six hogs of 110 MiB each.
Needs root, BPF, PostgreSQL and MariaDB; fails saying what is missing.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import pytest

from lab import require
from lab.cgroup import MemoryCgroup
from lab.fasthogs import HOG_SIZE, HOGS, LIMIT, Round, bpf_counters, kills_by_path, one_round, postgres_side
from lab.mariadb import free_port
from lab.scenario import ScenarioEnv, dbguard_guard
from lab.watch import Kmsg

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]

MiB = 1024**2
ROUNDS = 10
COUNTED = ("reclaim_failed", "kills", "kills_for_other", "no_victim", "kill_errors")


def guard_config() -> tuple[dict, str]:
    """dbguard with BPF on, and its metrics (the BPF programs' counters, for the report)."""
    port = free_port()
    return {"bpf": {"enabled": True}, "metrics": {"listen": f"127.0.0.1:{port}"}}, f"http://127.0.0.1:{port}/metrics"


def run_rounds(cg: MemoryCgroup, procs, workdir: Path, run, metrics: str,
               healthy: Callable[[], str]) -> list[tuple[Round, str, bool, dict]]:
    """ROUNDS rounds; after each, what the database side says (healthy(): "" when all is well),
    whether dbguard still runs, and what the BPF programs counted during it."""
    out = []
    before = bpf_counters(metrics)
    with contextlib.closing(Kmsg()) as kmsg:
        for i in range(ROUNDS):
            r = one_round(cg, workdir, str(i), kmsg, procs)
            time.sleep(1.5)          # the daemon's next drain of the BPF counters (a cycle: 1 s at rest)
            now = bpf_counters(metrics)
            counted = {k: now.get(k, 0) - before.get(k, 0) for k in COUNTED}
            before = now
            out.append((r, healthy(), run.running(), counted))
    return out


def check(rounds: list[tuple[Round, str, bool, dict]], audit: list[dict], what: str) -> None:
    """Every round: no kernel OOM kill (counter and kernel log), the database healthy,
    dbguard running, and where a failing streak reached the kernel's gate, a hog of the round
    killed by dbguard's BPF program (audited); in some round, the kernel path acted."""
    lines, bad, bpf_rounds = [], [], 0
    for i, (r, database, running, counted) in enumerate(rounds):
        kills = kills_by_path(audit, r.pids)
        lines.append(f"round {i}: {r.killed} hogs killed ({kills['bpf']} by BPF, {kills['bpf_for_other']} of them "
                     f"for a stuck task, {kills['user']} by user space), "
                     f"kernel OOM kills {r.oom_kills} (counter) {r.kmsg_victims} (log), limit hit {r.limit_hits} times; "
                     f"BPF counted {counted}"
                     f"{', database: ' + database if database else ''}{'' if running else ', dbguard not running'}")
        ran_out = counted["kills"] or counted["no_victim"]      # a failing streak reached the gate
        if r.oom_kills or r.kmsg_victims or database or not running or (ran_out and not kills["bpf"]):
            bad.append(i)
        bpf_rounds += bool(kills["bpf"])
    kernel = [r for r in audit if r.get("action") == "kernel_oom_kill"]
    summary = (f"{what}:\n  " + "\n  ".join(lines) + "\n  kernel OOM path in dbguard's audit (the kernel's "
               "reaping of a task already killed counts no kill): "
               + "; ".join(f"{k['target']}: {k['reason']}" for k in kernel))
    print(summary)
    assert not bad, f"rounds {bad} failed; {summary}"
    assert bpf_rounds, f"the kernel path never acted: the test proves nothing; {summary}"
    breaches = [r for r in audit if r.get("result", "").startswith("breach")]
    assert not breaches, breaches


def test_fast_hogs_next_to_postgresql(procs, tmp_path):
    require.root("the fast-hogs test (memory cgroups)")
    require.postgresql()
    require.pgbench()
    config, metrics = guard_config()
    # Room for half the hogs above what PostgreSQL cannot give back under pgbench (its shared
    # buffers and backends; its page cache can go), as next to MariaDB below: with the fixed
    # LIMIT the kernel path acted in 3 of 10 rounds of a run (git 8451221), user space ending a
    # hog at "high" in the others, so a run could pass without the kernel path acting.
    with postgres_side(tmp_path, lambda env: dbguard_guard(env, extra_config=config), print,
                       warmup=3, room=HOGS // 2 * HOG_SIZE) as pg:
        rounds = run_rounds(pg.cgroup, procs, tmp_path, pg.guard, metrics, pg.healthy)
        check(rounds, pg.guard.audit(), "PostgreSQL")


def test_fast_hogs_next_to_mariadb(procs, tmp_path):
    from lab.mariadb import MariaDB, ReadLoad, load_table
    require.root("the fast-hogs test (memory cgroups)")
    require.mariadb()
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(MemoryCgroup(4096 * MiB))
        db = stack.enter_context(MariaDB(settings={"innodb_buffer_pool_size": "384M"}, cgroup=cg))
        load_table(db, 1_500_000)
        db.grant_dbguard()
        cg.set_limit(LIMIT)
        server = db.pid()
        env = ScenarioEnv(cg, db, tmp_path, tmp_path / "audit.jsonl", lambda m: None)
        config, metrics = guard_config()
        run = stack.enter_context(dbguard_guard(env, extra_config=config))
        load = stack.enter_context(ReadLoad(db, 1_500_000, clients=2))
        time.sleep(3)
        # Room for half the hogs above what the cgroup cannot give back under MariaDB's load,
        # which varies from run to run. With a fixed LIMIT the six hogs could fail to overrun it:
        # in a CI rehearsal (git fc19f47) every round ended with five hogs holding (so MariaDB held
        # at most 900 - 5 x 124 MiB) after user space ended one at "high", the limit never hit,
        # and the kernel path had no round to act in. Six hogs now overrun it by three hogs' worth.
        held = cg.limit_above_held(HOGS // 2 * HOG_SIZE)
        print(f"MariaDB holds {held // MiB} MiB it cannot give back under its load; limit {cg.limit_bytes // MiB} MiB")

        def healthy() -> str:
            problems = []
            if not (db.running() and db.pid() == server):
                problems.append("mariadbd died or was restarted")
            if "crash recovery" in db.log_tail(400):
                problems.append("crash recovery in the server log")
            if not load.running():
                problems.append("the read clients stopped")
            return "; ".join(problems)

        rounds = run_rounds(cg, procs, tmp_path, run, metrics, healthy)
        summary = load.stop()
        check(rounds, run.audit(), "MariaDB")
        assert summary.queries_failed == 0 and summary.sessions_lost == 0, summary
