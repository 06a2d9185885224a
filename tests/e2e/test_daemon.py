"""`dbguard run` as users start it: bad input, a database that is down, dry-run, SIGHUP, SIGTERM.

Each run watches its own memory cgroup (made under the suite's cgroup) with a real hog in it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.cgroup import MemoryCgroup
from lab.hog import spawn

pytestmark = [pytest.mark.e2e, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
DBGUARD = [sys.executable, "-m", "dbguard.cli"]


def _audit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _config(tmp: Path, cg: MemoryCgroup, extra: str = "") -> Path:
    q = json.dumps
    cfg = tmp / "dbguard.toml"
    cfg.write_text("\n".join([
        "[general]", "interval = 0.2", f"state_dir = {q(str(tmp / 'state'))}",
        "[[databases]]", 'name = "gone"', 'kind = "postgresql"',
        # Nothing listens on port 1: the database is down from the start.
        'dsn = "host=127.0.0.1 port=1 dbname=postgres user=postgres"', "connect_timeout = 0.5",
        "[pressure]", f"cgroup = {q(str(cg.path))}", "min_dwell = 1.0",
        "[audit]", f"path = {q(str(tmp / 'audit.jsonl'))}",
        "[metrics]", 'listen = ""', extra, ""]))
    return cfg


class Run:
    def __init__(self, cfg: Path, *args: str):
        self.out = cfg.parent / "dbguard.out"
        self.audit = cfg.parent / "audit.jsonl"
        with open(self.out, "wb") as f:
            self.p = subprocess.Popen([*DBGUARD, "run", "--config", str(cfg), *args], cwd=ROOT, stdout=f,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_for(lambda: any(r["action"] == "start" for r in _audit(self.audit)), 30, "the start record")

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.p.poll() is not None:
                pytest.fail(f"dbguard exited ({self.p.returncode}) waiting for {what}: {self.output()}")
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; audit: {_audit(self.audit)}; output: {self.output()}")

    def output(self) -> str:
        return self.out.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                pytest.fail("dbguard did not stop within 20 s of SIGTERM")
        return self.p.returncode


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pressure]\nwarn_usage = 0.99\nhigh_usage = 0.5\n")
    r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip().count("\n") == 0 and "warn_usage < high_usage" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_audit_path_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    (tmp_path / "file").write_text("")
    cfg.write_text(f'[audit]\npath = "{tmp_path}/file/audit.jsonl"\n[metrics]\nlisten = ""\n'
                   f'[general]\nstate_dir = "{tmp_path}/state"\n')
    r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "audit.path: cannot open" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_database_down_does_not_stop_protection_hog_killed_by_pidfd(tmp_path):
    with MemoryCgroup(200 * MiB) as cg:
        run = Run(_config(tmp_path, cg))
        try:
            assert "gone" in run.output() and "protection goes on without SQL" in run.output()
            hog = spawn(190 * MiB, 5 * MiB, 0.05, 60, preexec_fn=cg.preexec())
            hog.wait(30)
            kills = [r for r in _audit(run.audit) if r["action"] == "kill" and r.get("pid") == hog.pid]
            assert hog.returncode == -signal.SIGKILL, f"hog ended with {hog.returncode}; {_audit(run.audit)}"
            assert kills and kills[0]["result"].startswith("killed"), _audit(run.audit)
            assert cg.oom_kills() == 0, "the kernel had to step in"
            score = [r for r in _audit(run.audit) if r["action"] == "set_oom_score_adj" and r.get("pid") == hog.pid]
            assert score and score[0]["value"] == 500, "the hog's score was not raised first"
        finally:
            assert run.stop() == 0, run.output()
    actions = [r["action"] for r in _audit(run.audit)]
    assert actions[0] == "start" and actions[-1] == "stop"
    for r in _audit(run.audit):
        assert {"ts", "action", "target", "reason", "level", "result"} <= r.keys(), r


def test_dry_run_logs_the_kill_and_changes_nothing(tmp_path):
    with MemoryCgroup(220 * MiB) as cg:
        run = Run(_config(tmp_path, cg), "--dry-run")
        hog = spawn(190 * MiB, 10 * MiB, 0.02, 60, preexec_fn=cg.preexec())
        try:
            run.wait_for(lambda: any(r["action"] == "kill" and r.get("pid") == hog.pid for r in _audit(run.audit)),
                         30, "a dry-run kill record for the hog")
            time.sleep(1)
            assert hog.poll() is None, "dry run killed the hog"
            with open(f"/proc/{hog.pid}/oom_score_adj") as f:
                assert int(f.read()) == 0, "dry run changed the hog's oom_score_adj"
            recs = [r for r in _audit(run.audit) if r["action"] in ("kill", "set_oom_score_adj")]
            assert recs and all(r["dry_run"] and r["result"].startswith("dry_run") for r in recs), recs
        finally:
            hog.kill()
            hog.wait()
            assert run.stop() == 0


def test_sighup_reloads_and_a_bad_reload_keeps_the_running_config(tmp_path):
    with MemoryCgroup(200 * MiB) as cg:
        cfg = _config(tmp_path, cg)
        run = Run(cfg)
        try:
            cfg.write_text(cfg.read_text().replace('min_dwell = 1.0', 'min_dwell = 2.0'))
            os.kill(run.p.pid, signal.SIGHUP)
            run.wait_for(lambda: any(r["action"] == "reload" for r in _audit(run.audit)), 10, "a reload record")
            cfg.write_text(cfg.read_text() + "\n[kill]\nbogus = 1\n")
            os.kill(run.p.pid, signal.SIGHUP)
            run.wait_for(lambda: "kill.bogus: unknown key" in run.output(), 10, "the reload error")
            assert run.p.poll() is None, "a bad reload stopped dbguard"
        finally:
            assert run.stop() == 0
