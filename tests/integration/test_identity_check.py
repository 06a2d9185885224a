"""`dbguard check` and `dbguard explain` on a configured database no fact identifies: protection
is degraded, said in one line with the fix, and check exits 3 (the real host, no database)."""
from __future__ import annotations

import json
import subprocess

import pytest

from lab.launcher import REPO, dbguard_command

pytestmark = pytest.mark.root


def _config(tmp_path) -> str:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[databases]]\nname = "gone"\nkind = "postgresql"\n'
                   f'dsn = "host={tmp_path}/nosock port=5999 dbname=postgres user=postgres"\n'
                   f'[general]\nstate_dir = "{tmp_path}/state"\n[audit]\npath = "{tmp_path}/log/audit.jsonl"\n'
                   '[metrics]\nlisten = ""\n')
    return str(cfg)


def test_check_says_degraded_and_exits_3(tmp_path):
    r = subprocess.run(dbguard_command("check", "--config", _config(tmp_path)), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, r
    lines = [ln for ln in r.stdout.splitlines() if "identify_database" in ln or ln.startswith("degraded:")]
    assert lines[0].startswith("OFF  identify_database      postgresql gone: not identified: cannot read "
                               f"{tmp_path}/nosock/.s.PGSQL.5999.lock"), r.stdout
    assert lines[1].startswith("degraded: postgresql gone: server not identified") and "Fix: run dbguard as root" \
        in lines[1], r.stdout
    r = subprocess.run(dbguard_command("check", "--json", "--config", _config(tmp_path)), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout)
    assert r.returncode == 3 and out["status"] == "degraded" and len(out["degraded"]) == 1, out


def test_explain_says_degraded(tmp_path):
    r = subprocess.run(dbguard_command("explain", "--config", _config(tmp_path)), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\ndegraded: postgresql gone: server not identified" in r.stdout, r.stdout
