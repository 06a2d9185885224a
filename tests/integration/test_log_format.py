"""`--log-format text|json` and `--log-level`, before or after the subcommand, on a real
`dbguard run`; with stderr being "the journal" (JOURNAL_STREAM naming that very file, as
systemd sets it) no line carries a timestamp of its own."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from lab.launcher import REPO, audit_records, base_config, dbguard_command, toml

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def run_briefly(tmp_path: Path, *args: str, journal: bool = False) -> list[str]:
    cfg = base_config(tmp_path)
    cfg["general"] = {**cfg["general"], "discover": False, "lock_memory": False}
    cfg["bpf"] = {"enabled": False}
    config = tmp_path / "dbguard.toml"
    config.write_text(toml(cfg))
    err = tmp_path / "stderr"
    err.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOURNAL_STREAM", "DBGUARD_LOG"))}
    if journal:
        st = err.stat()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    with open(err, "ab") as f:
        proc = subprocess.Popen(dbguard_command(*args[:1], "--config", str(config), "--dry-run", *args[1:]),
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
    try:
        while not [r for r in audit_records(tmp_path / "audit.jsonl") if r["action"] == "start"]:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()
    return [line for line in err.read_text().splitlines() if line]


def test_json_after_the_subcommand(tmp_path):
    (tmp_path / "info").mkdir()
    (tmp_path / "warning").mkdir()
    records = [json.loads(line) for line in run_briefly(tmp_path / "info", "run", "--log-format", "json")]
    assert {"ts", "level", "message"} <= set(records[0])     # every line is one JSON object
    assert any(r["message"].startswith("dbguard started") and r["level"] == "info" for r in records)
    quiet = [json.loads(line) for line in run_briefly(tmp_path / "warning", "run", "--log-format", "json",
                                                       "--log-level", "warning")]
    assert "info" not in {r["level"] for r in quiet}, "--log-level after the subcommand was ignored"


def test_text_has_its_timestamp_off_the_journal_and_none_on_it(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "journal").mkdir()
    plain = run_briefly(tmp_path / "plain", "run")
    assert plain and all(STAMP.match(line) for line in plain), plain[:3]
    assert not any(" DEBUG " in line for line in plain)
    journal = run_briefly(tmp_path / "journal", "run", journal=True)
    assert journal and not any(STAMP.match(line) for line in journal), journal[:3]
    assert all(line.startswith("dbguard ") for line in journal), journal[:3]


def test_json_on_the_journal_has_no_ts(tmp_path):
    lines = run_briefly(tmp_path, "run", "--log-format", "json", journal=True)
    assert lines and all("ts" not in json.loads(line) for line in lines)
