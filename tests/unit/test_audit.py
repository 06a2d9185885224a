"""The audit log never stops protection: a write that fails is logged once per kind and counted."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbguard.audit import AuditLog
from dbguard.errors import DbguardError

ROOT = Path(__file__).resolve().parents[2]


def test_records_are_json_lines(tmp_path):
    a = AuditLog(str(tmp_path / "log" / "audit.jsonl"))
    a.write({"action": "start", "target": "dbguard", "reason": "r", "level": "ok", "result": "x\ny"})
    a.write({"action": "stop", "target": "dbguard", "reason": "r", "level": "ok", "result": "ok"})
    a.close()
    lines = (tmp_path / "log" / "audit.jsonl").read_text().splitlines()
    assert [json.loads(ln)["action"] for ln in lines] == ["start", "stop"]
    assert os.stat(tmp_path / "log").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "log" / "audit.jsonl").st_mode & 0o777 == 0o640


def test_dev_full_is_logged_once_counted_each_time_and_never_raised(caplog):
    errors = []
    a = AuditLog("/dev/full", on_error=errors.append)
    with caplog.at_level(logging.INFO, logger="dbguard"):
        for i in range(5):
            rec = a.write({"action": "kill", "target": f"pid {i}", "reason": "r", "level": "high", "result": "killed"})
            assert rec["target"] == f"pid {i}"
    a.close()
    assert errors == ["ENOSPC"] * 5
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and "cannot write to /dev/full" in failures[0] and "ENOSPC" in failures[0]
    # the decisions themselves still reach the log
    assert sum("kill pid" in r.getMessage() for r in caplog.records) == 5


def test_a_file_size_limit_is_an_error_not_a_death(tmp_path):
    """RLIMIT_FSIZE: the write that crosses it is cut short, the next fails with EFBIG
    (SIGXFSZ ignored, as cli.main does); lines stay whole around the cut."""
    path = tmp_path / "audit.jsonl"
    script = f"""
import json, logging, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
from dbguard.audit import AuditLog
errors = []
a = AuditLog({str(path)!r}, on_error=errors.append)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
for i in range(40):
    a.write({{"action": "kill", "target": "pid %d" % i, "reason": "r" * 20, "level": "high", "result": "killed"}})
print(json.dumps(errors))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    errors = json.loads(r.stdout)
    assert errors and set(errors) == {"EFBIG"}, errors
    assert r.stderr.count("cannot write to") == 1 and "EFBIG" in r.stderr
    data = path.read_bytes()
    assert len(data) == 1000
    whole = data.split(b"\n")[:-1]
    assert len(whole) + len(errors) == 40, (len(whole), len(errors))   # the cut record counts as lost
    assert all(json.loads(ln)["action"] == "kill" for ln in whole)


def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    d = tmp_path / "log"
    d.mkdir(mode=0o700)
    (d / "audit.jsonl").symlink_to(victim)
    with pytest.raises(DbguardError) as e:
        AuditLog(str(d / "audit.jsonl"))
    assert str(e.value) == (f"audit.path: {d}/audit.jsonl is a symbolic link; dbguard does not write through "
                            "links as root: point it at the file itself")
    assert victim.read_text() == "precious\n"


def test_a_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "audit.jsonl")
    with pytest.raises(DbguardError, match="not a regular file|cannot open"):
        AuditLog(str(tmp_path / "audit.jsonl"))


def test_a_group_writable_directory_is_refused(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    d.chmod(0o775)
    with pytest.raises(DbguardError) as e:
        AuditLog(str(d / "audit.jsonl"))
    assert str(e.value) == f"audit.path: {d} can be written by group or others (mode 0775): chmod go-w {d}"
    assert not (d / "audit.jsonl").exists()
