"""The audit log under logrotate: debian/dbguard.logrotate's rules run by the real logrotate on a
running dbguard (paths moved into a temp dir, its postrotate's `systemctl reload` replaced by
the SIGHUP it sends): records before the rotation are in the rotated file, records after it
in the new one, none lost."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.launcher import DbguardRun, audit_records, base_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "debian" / "dbguard.logrotate"


def test_rotation_then_sighup_moves_the_records_to_the_new_file(tmp_path):
    logrotate = shutil.which("logrotate")
    if not logrotate:
        pytest.fail("logrotate is missing: apt-get install logrotate", pytrace=False)
    with DbguardRun(tmp_path, {**base_config(tmp_path), "bpf": {"enabled": False},
                               "general": {**base_config(tmp_path)["general"], "discover": False,
                                           "lock_memory": False}}, "--dry-run") as run:
        run.wait_protecting()
        conf = SHIPPED.read_text().replace("/var/log/dbguard/*.jsonl", str(tmp_path / "*.jsonl"))
        conf = re.sub(r"systemctl reload dbguard\.service", f"kill -HUP {run.pid}", conf)
        assert f"kill -HUP {run.pid}" in conf
        (tmp_path / "logrotate.conf").write_text(conf)
        r = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "logrotate.state"),
                            str(tmp_path / "logrotate.conf")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        rec = run.wait_record(lambda r: r["action"] == "reload", 30, "the reload record in the new file")
        assert rec["reason"] == "SIGHUP"
    rotated = audit_records(tmp_path / "audit.jsonl.1")
    current = audit_records(tmp_path / "audit.jsonl")
    assert rotated[0]["action"] == "start" and "reload" not in [r["action"] for r in rotated]
    assert current[0]["action"] == "reload" and "start" not in [r["action"] for r in current]
