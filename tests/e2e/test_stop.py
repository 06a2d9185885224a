"""Stopping `dbguard run`: SIGTERM is acted on at once, not after the poll interval, and what
dbguard changed is put back — the DBA's settings (audited, step by step) and the scores it raised.
"""
from __future__ import annotations

import os
import time

import pytest

from lab.hog import spawn
from lab.launcher import DbguardRun, base_config
from lab.pgcluster import PgCluster

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024


def _score(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


@pytest.mark.db
def test_sigterm_with_a_60s_interval_stops_at_once_and_puts_the_settings_back(tmp_path, make_cgroup,
                                                                             postgresql_host):
    cg = make_cgroup(400 * MiB)
    with PgCluster(settings={"work_mem": "64MB"}) as cluster:
        cfg = base_config(tmp_path, cg.path)
        cfg["general"].update(interval=60.0, lock_memory=False)
        # min_dwell 600: once the hog is gone the level is only held by dwell, so the caches stay
        # shrunk and the loop sleeps its full interval — the case where SIGTERM used to wait.
        cfg["pressure"].update(min_dwell=600.0)
        cfg["bpf"] = {"enabled": False}
        cfg["databases"] = [{"kind": "postgresql", "name": "main", "dsn": cluster.dsn}]
        hog = spawn(340 * MiB, 10 * MiB, 0.0, 600, preexec_fn=cg.preexec())
        try:
            with DbguardRun(tmp_path, cfg) as run:
                run.wait_protecting()
                run.wait_record(lambda r: r["action"] == "shrink_cache" and r.get("outcome") == "done", 60,
                                "a shrink at warn")
                assert cluster.psql("SHOW work_mem").strip() == "32MB"
                hog.kill()
                hog.wait()
                time.sleep(2.0)                  # the loop has seen the hog go and sleeps for 60 s
                t0 = time.monotonic()
                assert run.stop(timeout=30) == 0
                took = time.monotonic() - t0
                assert took < 10, f"SIGTERM took {took:.1f}s: it waited out the 60 s interval"
                restores = [r for r in run.audit() if r["action"] == "restore_cache"]
        finally:
            if hog.poll() is None:
                hog.kill()
                hog.wait()
        assert restores and all(r["outcome"] == "done" for r in restores), restores
        assert cluster.psql("SHOW work_mem").strip() == "64MB", "the DBA's work_mem is back"
        assert not list((tmp_path / "state").glob("originals-*.json")), "no originals left to put back"
        print(f"SIGTERM to exit: {took:.2f}s with interval = 60; {len(restores)} restore step(s) audited")


def test_the_scores_dbguard_raised_are_put_back_at_stop(tmp_path, make_cgroup, procs):
    cg = make_cgroup(1000 * MiB)
    hog = spawn(64 * MiB, 8 * MiB, 0.0, 600, preexec_fn=cg.preexec())
    try:
        before = _score(hog.pid)
        cfg = base_config(tmp_path, cg.path)
        cfg["general"].update(lock_memory=False)
        cfg["bpf"] = {"enabled": False}
        cfg["kill"] = {"protect_exe": [], "min_rss": "32MiB"}
        with DbguardRun(tmp_path, cfg) as run:
            run.wait_protecting()
            run.wait_record(lambda r: r["action"] == "set_oom_score_adj" and r.get("pid") == hog.pid
                            and r.get("outcome") == "done", 30, "the hog's score raised")
            assert _score(hog.pid) == 500
        assert _score(hog.pid) == before, "raised for dbguard's sake, put back when it stopped"
        undo = [r for r in run.audit() if r["action"] == "set_oom_score_adj" and r.get("pid") == hog.pid]
        assert [r["value"] for r in undo] == [500, before] and undo[-1]["outcome"] == "done"
        assert os.path.exists(f"/proc/{hog.pid}"), "the hog itself was left alone"
    finally:
        hog.kill()
        hog.wait()
