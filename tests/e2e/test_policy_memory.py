"""The policy's memory outlives a new configuration: a SIGHUP reload and a newly discovered
database swap the config, never the kill or cancel rate or a session's cancel→terminate escalation.

The real daemon object runs its real cycle (sense a real memory cgroup holding real hogs, a
real PostgreSQL, decide, act) in dry-run, so nothing is killed or cancelled and the pressure
stays put while the configuration changes under it. Each test fails on a daemon that rebuilds
its memory with its configuration: the kill rate would allow a second kill, and the session
would be cancelled a second time instead of terminated.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from dbguard import config, sensor
from dbguard.daemon import Daemon
from lab import hog
from lab.cgroup import MemoryCgroup
from lab.pgcluster import PgCluster

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.db]

MiB = 1024 * 1024
LIMIT = 500 * MiB
HOG = 110 * MiB           # four of them (plus their interpreters) hold ~94 % of the limit: level high


def _toml(tmp: Path, cg: MemoryCgroup, databases: str, protect: str = "", **kill) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in kill.items())
    return (f'[general]\ndry_run = true\nstate_dir = "{tmp}/state"\nlock_memory = false\n'
            f'[pressure]\ncgroup = "{cg.path}"\nmin_dwell = 0.0\n'
            f'[kill]\nprotect_exe = [{protect}]\nmin_interval = 0.0\nmax_per_minute = 1\n{extra}'
            f'[bpf]\nenabled = false\n[metrics]\nlisten = ""\n[audit]\npath = "{tmp}/audit.jsonl"\n'
            + databases)


def _hogs(cg: MemoryCgroup, n: int) -> list:
    procs = [hog.spawn(HOG, 10 * MiB, 0.0, 600, preexec_fn=cg.preexec()) for _ in range(n)]
    deadline = time.monotonic() + 60
    while cg.usage() < n * HOG and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cg.usage() >= n * HOG, f"hogs did not grow: usage {cg.usage() // MiB} MiB"
    return procs


def _stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def _kills(plan_actions) -> list[int]:
    return [a.pid for a in plan_actions if a.kind.value == "kill"]


def _cycle(d: Daemon):
    """One real cycle, returning what it planned (dry run: planned and audited, not done)."""
    x, = d.cycle()          # one scope: the cgroup of [pressure] cgroup
    return x.assessment, x.plan


def test_cancel_rate_and_escalation_survive_sighup(tmp_path):
    """The database as its own hog: the hogs here are protected (kill.protect_exe), so the
    pressure is answered by ending sessions. One cancel a minute (max_per_minute = 1): the
    first cycle cancels one of the two running statements; after the reload, the cancelled
    one escalates to terminate and the other is still not cancelled."""
    python = os.path.realpath(sys.executable)
    with MemoryCgroup(LIMIT) as cg, PgCluster() as cluster:
        db = (f'[[databases]]\nkind = "postgresql"\nname = "main"\ndsn = "{cluster.dsn}"\n'
              f'runaway_min_bytes = "1"\nterminate_after = 1.0\n')
        cfg_path = tmp_path / "dbguard.toml"
        cfg_path.write_text(_toml(tmp_path, cg, db, protect=f'"{python}"'))
        sleepers = [_Sleeper(cluster.dsn) for _ in range(2)]
        hogs = _hogs(cg, 4)
        d = Daemon(config.load(cfg_path))
        try:
            d.open()
            a, plan = _cycle(d)
            assert a.level.name in ("HIGH", "CRITICAL"), a.why
            assert _kills(plan.actions) == [], "the hogs are protected"
            cancels = [x.pid for x in plan.actions if x.kind.value == "cancel_query"]
            assert len(cancels) == 1 and cancels[0] in {s.pid for s in sleepers}, plan.actions
            # SIGHUP with a changed threshold: the new config applies, the memory stays.
            cfg_path.write_text(_toml(tmp_path, cg, db, protect=f'"{python}"', min_rss='"16MiB"'))
            d.reload()
            assert d.cfg.kill.min_rss == 16 * MiB, "the reload took effect"
            time.sleep(1.2)                       # past terminate_after
            a, plan = _cycle(d)
            assert a.level.name in ("HIGH", "CRITICAL"), a.why
            ended = [(x.kind.value, x.pid) for x in plan.actions if x.kind.value.endswith(("_query", "_session"))]
            assert ended == [("terminate_session", cancels[0])], \
                f"escalation to terminate, no second cancel (rate and memory survive the reload): {plan.actions}"
        finally:
            d.close()
            _stop(hogs)
            for s in sleepers:
                s.close()


class _Sleeper:
    """A client session running a long statement (pg_sleep), ended at close()."""

    def __init__(self, dsn: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.pid = self.conn.info.backend_pid
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.execute("SELECT pg_sleep(120)")
        except psycopg.Error:
            pass          # cancelled at the end of the test

    def close(self) -> None:
        self.conn.cancel()
        self.thread.join(10)
        self.conn.close()


def test_kill_rate_and_level_survive_a_newly_discovered_database(tmp_path, monkeypatch):
    monkeypatch.setattr(sensor, "REDISCOVER_EVERY", 0.0)
    with MemoryCgroup(LIMIT) as cg:
        cfg_path = tmp_path / "dbguard.toml"
        cfg_path.write_text(_toml(tmp_path, cg, ""))
        hogs = _hogs(cg, 4)
        d = Daemon(config.load(cfg_path))
        try:
            d.open()
            a, plan = _cycle(d)
            assert len(_kills(plan.actions)) == 1, plan.actions
            state, level = d.watches[0].state, d.level
            with PgCluster() as cluster:
                a, plan = _cycle(d)
                names = {dc.data_directory for dc in d.sensor.db_configs}
                assert cluster.data_dir in names, f"the new cluster was discovered: {names}"
                assert d.watches[0].state is state and d.level >= level
                assert _kills(plan.actions) == [], f"the kill rate survives the rediscovery: {plan.actions}"
        finally:
            d.close()
            _stop(hogs)
