"""`dbguard run` as users start it: bad input, a database that is down, dry-run, SIGHUP, SIGTERM.

Each run watches its own memory cgroup (made under the suite's cgroup) with a real hog in it.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from dbguard.errors import DbguardError
from lab.cgroup import MemoryCgroup
from lab.hog import spawn
from lab.launcher import REPO, DbguardRun, base_config, dbguard_command

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024


def _config(tmp: Path, cg: MemoryCgroup) -> dict:
    cfg = base_config(tmp, cg.path)
    cfg["general"]["interval"] = 0.2
    # Nothing listens on port 1: the database is down from the start.
    cfg["databases"] = [{"name": "gone", "kind": "postgresql",
                         "dsn": "host=127.0.0.1 port=1 dbname=postgres user=postgres", "connect_timeout": 0.5}]
    cfg["pressure"]["min_dwell"] = 1.0
    return cfg


def _start(tmp: Path, cfg: dict, *args: str) -> DbguardRun:
    run = DbguardRun(tmp, cfg, *args)
    try:
        run.wait_protecting(timeout=30)
    except DbguardError as e:
        run.stop()
        pytest.fail(str(e))
    return run


def _wait_for(run: DbguardRun, cond, timeout: float, what: str) -> None:
    try:
        run.wait_for(cond, timeout, what)
    except DbguardError as e:
        pytest.fail(str(e))


def _stop(run: DbguardRun) -> int:
    try:
        return run.stop(20)
    except DbguardError as e:
        pytest.fail(str(e))


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pressure]\nwarn_usage = 0.99\nhigh_usage = 0.5\n")
    r = subprocess.run(dbguard_command("run", "--config", str(cfg)), cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip().count("\n") == 0 and "warn_usage < high_usage" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_audit_path_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    (tmp_path / "file").write_text("")
    cfg.write_text(f'[audit]\npath = "{tmp_path}/file/audit.jsonl"\n[metrics]\nlisten = ""\n'
                   f'[general]\nstate_dir = "{tmp_path}/state"\n')
    r = subprocess.run(dbguard_command("run", "--config", str(cfg)), cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr == f"dbguard: audit.path: {tmp_path}/file is not a directory\n", r.stderr


def test_database_down_does_not_stop_protection_hog_killed_by_pidfd(tmp_path):
    with MemoryCgroup(200 * MiB) as cg:
        run = _start(tmp_path, _config(tmp_path, cg))
        try:
            assert "gone" in run.output() and "protection goes on without SQL" in run.output()
            hog = spawn(190 * MiB, 5 * MiB, 0.05, 60, preexec_fn=cg.preexec())
            hog.wait(30)
            kills = [r for r in run.audit() if r["action"] == "kill" and r.get("pid") == hog.pid]
            assert hog.returncode == -signal.SIGKILL, f"hog ended with {hog.returncode}; {run.audit()}"
            assert kills and kills[0]["result"].startswith("killed"), run.audit()
            assert cg.oom_kills() == 0, "the kernel had to step in"
            score = [r for r in run.audit() if r["action"] == "set_oom_score_adj" and r.get("pid") == hog.pid]
            assert score and score[0]["value"] == 500, "the hog's score was not raised first"
        finally:
            assert _stop(run) == 0, run.output()
    actions = [r["action"] for r in run.audit()]
    assert actions[0] == "start" and actions[-1] == "stop"
    for r in run.audit():
        assert {"ts", "action", "target", "reason", "level", "result"} <= r.keys(), r


def test_dry_run_logs_the_kill_and_changes_nothing(tmp_path):
    with MemoryCgroup(220 * MiB) as cg:
        run = _start(tmp_path, _config(tmp_path, cg), "--dry-run")
        hog = spawn(190 * MiB, 10 * MiB, 0.02, 60, preexec_fn=cg.preexec())
        try:
            _wait_for(run, lambda: any(r["action"] == "kill" and r.get("pid") == hog.pid for r in run.audit()),
                      30, "a dry-run kill record for the hog")
            time.sleep(1)
            assert hog.poll() is None, "dry run killed the hog"
            with open(f"/proc/{hog.pid}/oom_score_adj") as f:
                assert int(f.read()) == 0, "dry run changed the hog's oom_score_adj"
            recs = [r for r in run.audit() if r["action"] in ("kill", "set_oom_score_adj")]
            assert recs and all(r["dry_run"] and r["result"].startswith("dry_run") for r in recs), recs
        finally:
            hog.kill()
            hog.wait()
            assert _stop(run) == 0


def test_sighup_reloads_and_a_bad_reload_keeps_the_running_config(tmp_path):
    with MemoryCgroup(200 * MiB) as cg:
        cfg = _config(tmp_path, cg)
        run = _start(tmp_path, cfg)
        try:
            cfg["pressure"]["min_dwell"] = 2.0
            run.write_config(cfg)
            run.reload()
            _wait_for(run, lambda: any(r["action"] == "reload" for r in run.audit()), 10, "a reload record")
            cfg["kill"] = {"bogus": 1}
            run.write_config(cfg)
            run.reload()
            _wait_for(run, lambda: "kill.bogus: unknown key" in run.output(), 10, "the reload error")
            assert run.running(), "a bad reload stopped dbguard"
        finally:
            assert _stop(run) == 0


def test_a_sighup_while_it_starts_is_a_reload_not_its_end(tmp_path):
    """systemd's reload (ExecReload=kill -HUP) can come while dbguard is still starting. A
    database that accepts the connection and never answers holds dbguard inside its start
    (reaching the databases) for as long as the test wants: the SIGHUP lands there, before the
    "start" record, where once the signal's default action ended the process (exit -1). It must
    be kept: the start completes, a reload follows, and a SIGTERM then stops it cleanly."""
    import socket
    import threading
    held: list[socket.socket] = []
    with socket.socket() as listener, MemoryCgroup(200 * MiB) as cg:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        arrived = threading.Event()

        def hold() -> None:         # accept and never answer: libpq waits for its connect_timeout
            while True:
                try:
                    held.append(listener.accept()[0])
                except OSError:
                    return
                arrived.set()
        threading.Thread(target=hold, daemon=True).start()
        cfg = _config(tmp_path, cg)
        cfg["databases"][0].update(dsn=f"host=127.0.0.1 port={listener.getsockname()[1]} dbname=postgres "
                                   "user=postgres", connect_timeout=3.0)
        run = DbguardRun(tmp_path, cfg)
        try:
            assert arrived.wait(30), f"dbguard never connected to the silent database: {run.output()}"
            assert not [r for r in run.audit() if r["action"] == "start"], "the start was not held"
            run.reload()
            run.wait_protecting(timeout=60)
            _wait_for(run, lambda: any(r["action"] == "reload" for r in run.audit()), 20, "a reload record")
            assert run.running(), f"the SIGHUP ended dbguard: {run.output()}"
        finally:
            code = _stop(run)
            for s in held:
                s.close()
    assert code == 0, run.output()
