"""What the dbguard command prints: escaped names, `check` exit codes and --json, a closed pipe."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DBGUARD = [sys.executable, "-m", "dbguard.cli"]

# A process that names itself with a newline and an escape sequence (prctl PR_SET_NAME, 15 bytes)
# and carries one in its command line.
EVIL = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"ev\\nil\\x1b[2J", 0, 0, 0)
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(600)
"""


def _cfg(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[general]\ndiscover = false\nstate_dir = "{tmp_path}/state"\n'
                   f'[audit]\npath = "{tmp_path}/audit.jsonl"\n[metrics]\nlisten = ""\n{extra}')
    return cfg


def test_explain_escapes_a_hostile_process_name(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", EVIL, "arg\x1b]0;title\x07"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        assert Path(f"/proc/{p.pid}/comm").read_text() == "ev\nil\x1b[2J\n"
        r = subprocess.run([*DBGUARD, "explain", "-c", str(_cfg(tmp_path)), "--pid", str(p.pid)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout
        assert r.stdout.splitlines()[0].startswith(f"pid {p.pid} (ev\\x0ail\\x1b[2J): ")
        # --json keeps the raw name; JSON escapes it by itself
        r = subprocess.run([*DBGUARD, "explain", "-c", str(_cfg(tmp_path)), "--pid", str(p.pid), "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert json.loads(r.stdout)["processes"][0]["comm"] == "ev\nil\x1b[2J"
        # the whole listing, too
        r = subprocess.run([*DBGUARD, "explain", "-c", str(_cfg(tmp_path, '[kill]\nmin_rss = "1MiB"\n'))],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "\x1b" not in r.stdout and "ev\\x0ail" in r.stdout, r.stdout[-3000:]
    finally:
        p.kill()
        p.wait()


def test_explain_into_a_closed_pipe_is_quiet(tmp_path):
    cfg = _cfg(tmp_path)
    r = subprocess.run(f"set -o pipefail; {' '.join(DBGUARD)} explain -c {cfg} | head -1", shell=True,
                       executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("memory: ") and r.stdout.count("\n") == 1
    assert r.stderr == "", r.stderr
    # 0 when everything fit in the pipe before head left, else 141 as for a SIGPIPE death
    assert r.returncode in (0, 141), r.returncode
    # a reader gone before the first line: always the closed pipe, always quiet
    r = subprocess.run(f"set -o pipefail; {' '.join(DBGUARD)} explain -c {cfg} | (exec 0<&-; sleep 1)", shell=True,
                       executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stderr == "" and r.returncode == 141, (r.returncode, r.stderr)


def test_check_exit_code_follows_what_it_reports(tmp_path):
    r = subprocess.run([*DBGUARD, "check", "-c", str(_cfg(tmp_path, "[kill]\nenabled = false\n")), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout)
    found = {p["name"]: p for p in doc["protections"]}
    assert found["kill_hogs"]["active"] is False and "kill.enabled = true" in found["kill_hogs"]["detail"]
    assert doc["all_active"] is False and r.returncode == 3
    r2 = subprocess.run([*DBGUARD, "check", "-c", str(_cfg(tmp_path))], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    lines = r2.stdout.splitlines()
    off = [ln for ln in lines if ln.startswith("OFF")]
    assert len(lines) == len(doc["protections"])
    # exit 0 exactly when no line says OFF (which ones are off depends on this host)
    assert r2.returncode == (3 if off else 0), r2.stdout


def test_check_json_and_text_agree(tmp_path):
    cfg = str(_cfg(tmp_path))
    j = json.loads(subprocess.run([*DBGUARD, "check", "-c", cfg, "--json"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=60).stdout)
    text = subprocess.run([*DBGUARD, "check", "-c", cfg], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout.splitlines()
    assert [(ln[:3].strip() == "on", ln.split()[1]) for ln in text] == [(p["active"], p["name"])
                                                                       for p in j["protections"]]


def test_a_bad_config_for_check_is_exit_2(tmp_path):
    r = subprocess.run([*DBGUARD, "check", "-c", str(_cfg(tmp_path, "[general]\ninterval = nan\n"))], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2



def test_python_dash_m_dbguard_is_the_same_command(tmp_path):
    """`python -m dbguard` (no console script on the PATH, a venv, a container) runs the same
    command line: the same version, and the same one-line error and exit code for a bad config."""
    def run(*argv):
        return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
    from dbguard import __version__
    assert run("dbguard", "--version").stdout.split() == ["dbguard", __version__]
    bad = tmp_path / "bad.toml"
    bad.write_text("[general]\nintervall = 1\n")
    mine, script = run("dbguard", "check-config", str(bad)), run("dbguard.cli", "check-config", str(bad))
    assert (mine.returncode, mine.stderr) == (script.returncode, script.stderr) and mine.returncode == 2, mine
