"""integrations/systemd/dbguard.service: systemd-analyze verify and the offline security score.

No systemd runs as PID 1 here; both commands work on unit files without it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "integrations" / "systemd" / "dbguard.service"
INSTALLED_BIN = "/usr/bin/dbguard"        # where the .deb puts it
# `systemd-analyze security --offline=true` exposure measured for this unit (systemd 252).
# Lower is better; raise this only with a reason written next to the change.
EXPOSURE_BASELINE = 3.4
# Protect* settings that would break dbguard; the unit must leave them off and say why.
LEFT_OFF = ("ProtectKernelTunables", "ProtectControlGroups", "ProtectKernelModules",
            "ProtectProc", "ProcSubset", "MemoryDenyWriteExecute", "PrivateUsers", "PrivateNetwork")


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if not path:
        pytest.fail("systemd-analyze is missing: run `bash scripts/setup-integrations.sh` "
                    "(Debian package systemd)")
    return path


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            found.setdefault(m.group(1), []).append(m.group(2))
    return found


@pytest.fixture
def unit_here(tmp_path) -> Path:
    """The unit with this checkout's dbguard in place of the installed path, so verify can
    check that every command it runs exists and is executable."""
    dbguard = Path(sys.executable).parent / "dbguard"
    assert dbguard.exists(), f"{dbguard} missing: run `make venv`"
    path = tmp_path / "dbguard.service"
    path.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(dbguard)))
    return path


def test_systemd_analyze_verify_is_clean(unit_here):
    # --man=no: Documentation=man:dbguard(1) exists once the .deb is installed (test_deb.py
    # verifies the installed unit with the man check on)
    r = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit_here)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stdout + r.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    bad = tmp_path / "dbguard.service"
    bad.write_text(UNIT.read_text().replace(INSTALLED_BIN, "/nonexistent/dbguard"))
    r = subprocess.run([systemd_analyze(), "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "not executable" in r.stderr


def test_security_exposure_does_not_get_worse(unit_here):
    r = subprocess.run([systemd_analyze(), "security", "--offline=true", str(unit_here)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for dbguard\.service: (\d+\.\d)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= EXPOSURE_BASELINE, f"exposure rose from {EXPOSURE_BASELINE} to {exposure}"


def test_capabilities_are_explicit_and_each_explained():
    text = UNIT.read_text()
    d = directives(text)
    caps = d["CapabilityBoundingSet"][0].split()
    assert d["AmbientCapabilities"][0].split() == caps
    assert "CAP_SYS_ADMIN" not in caps
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_KILL", "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE"} <= set(caps)
    for cap in caps:
        assert re.search(rf"^#\s+{cap}\s+\S", text, re.M), f"{cap} has no comment saying why"


def test_required_settings_are_there():
    d = directives(UNIT.read_text())
    assert d["ProtectSystem"] == ["strict"]
    assert d["Restart"] == ["always"]
    # liveness: dbguard sends READY=1 and WATCHDOG=1 (test_systemd_notify.py), systemd restarts a stuck loop
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30s"]
    assert d["OOMScoreAdjust"] == ["-1000"]
    assert d["LimitMEMLOCK"] == ["infinity"]
    assert "MemoryMin" in d and "MemoryLow" in d
    assert d["StateDirectory"] == ["dbguard"] and d["LogsDirectory"] == ["dbguard"]
    assert d["ExecStartPre"][0] == f"{INSTALLED_BIN} check-config /etc/dbguard/dbguard.toml"
    assert d["ExecStart"] == [f"{INSTALLED_BIN} run --config /etc/dbguard/dbguard.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_settings_that_would_break_dbguard_are_off_and_explained():
    text = UNIT.read_text()
    d = directives(text)
    for name in LEFT_OFF:
        assert name not in d, f"{name} is set but breaks dbguard"
        assert re.search(rf"^#.*\b{name}\b", text, re.M), f"no comment on why {name} is left off"


def test_exec_start_pre_check_config_accepts_the_example_and_refuses_a_bad_file(tmp_path):
    dbguard = Path(sys.executable).parent / "dbguard"
    ok = subprocess.run([str(dbguard), "check-config", str(ROOT / "config.example.toml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[pressure]\nwarn_usage = 7\n")
    r = subprocess.run([str(dbguard), "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "pressure.warn_usage" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
