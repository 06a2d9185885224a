"""`dbguard run` against a careless operator and a hostile local user: an audit log that
cannot be written, hundreds of idle connections to the metrics port, hostile configs at start
and on SIGHUP, planted links, a damaged state file, a hog whose main thread has exited.

Each run watches its own memory cgroup (made under the suite's cgroup) and proves that
protection goes on by a real hog it kills: the hog dies by SIGKILL and dbguard's own log says so.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lab.cgroup import MemoryCgroup
from lab.hog import spawn

pytestmark = [pytest.mark.e2e, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
DBGUARD = [sys.executable, "-m", "dbguard.cli"]
NOBODY = 65534
SECRET = "S3cretCanary"


def _q(s) -> str:
    return json.dumps(str(s))       # a JSON string is a valid TOML basic string


def config_text(tmp: Path, cg: MemoryCgroup | None, *, audit: str | None = None, listen: str = "",
                extra: str = "") -> str:
    return "\n".join([
        "[general]", "interval = 0.2", "discover = false", f"state_dir = {_q(tmp / 'state')}",
        "[pressure]", *([f"cgroup = {_q(cg.path)}"] if cg else []), "min_dwell = 1.0",
        "[bpf]", "enabled = false",        # the user-space path is the one under test here
        "[audit]", f"path = {_q(audit or tmp / 'audit.jsonl')}",
        "[metrics]", f"listen = {_q(listen)}", extra, ""])


class Daemon:
    """dbguard run with its output on a pipe (a file would fall under RLIMIT_FSIZE too), read live."""

    def __init__(self, cfg: Path, preexec_fn=None):
        self.lines: list[str] = []
        self.p = subprocess.Popen([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                  errors="replace", start_new_session=True, preexec_fn=preexec_fn)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: "dbguard started:" in self.output(), 30, "dbguard to start")

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.p.poll() is not None:
                time.sleep(0.2)
                pytest.fail(f"dbguard exited ({self.p.returncode}) waiting for {what}: {self.output()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}: {self.output()[-3000:]}")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.p.pid}/task"))

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                pytest.fail("dbguard did not stop within 30 s of SIGTERM")
        self._reader.join(5)
        return self.p.returncode


def kill_a_hog(d: Daemon, cg: MemoryCgroup, hog: subprocess.Popen | None = None) -> None:
    """A hog grows past the high mark of a 200 MiB cgroup: dbguard must kill it, by pidfd."""
    hog = hog or spawn(190 * MiB, 5 * MiB, 0.05, 60, preexec_fn=cg.preexec(), stdout=subprocess.DEVNULL)
    try:
        hog.wait(40)
    except subprocess.TimeoutExpired:
        hog.kill()
        hog.wait()
        pytest.fail(f"the hog was not killed within 40 s: {d.output()[-3000:]}")
    assert hog.returncode == -signal.SIGKILL, f"hog ended with {hog.returncode}: {d.output()[-3000:]}"
    d.wait_for(lambda: any(f"pid {hog.pid}," in ln and ln.split(" -> ")[-1].startswith("killed")
                           for ln in d.lines if " kill " in ln), 10, "dbguard's own log line for the kill")
    assert cg.oom_kills() == 0, "the kernel had to step in"
    assert d.p.poll() is None, "dbguard stopped"


# --- audit log that cannot be written --------------------------------------------------------------

def test_audit_log_on_dev_full_does_not_stop_protection(tmp_path):
    cfg = tmp_path / "c.toml"
    with MemoryCgroup(200 * MiB) as cg:
        cfg.write_text(config_text(tmp_path, cg, audit="/dev/full"))
        d = Daemon(cfg)
        try:
            kill_a_hog(d, cg)
            kill_a_hog(d, cg)
            errors = [ln for ln in d.lines if "cannot write to /dev/full" in ln]
            assert len(errors) == 1 and "ENOSPC" in errors[0], errors      # once per kind, not per record
        finally:
            assert d.stop() == 0, d.output()[-3000:]


def test_audit_log_over_a_file_size_limit_does_not_stop_protection(tmp_path):
    """RLIMIT_FSIZE: SIGXFSZ would end dbguard; ignored, the write fails with EFBIG."""
    cfg = tmp_path / "c.toml"
    audit = tmp_path / "log" / "audit.jsonl"
    audit.parent.mkdir(mode=0o700)
    limit = 4096
    filler = len(json.dumps({"action": "old", "pad": ""})) + 1
    audit.write_text(json.dumps({"action": "old", "pad": "x" * (limit - filler)}) + "\n")    # full already
    assert audit.stat().st_size == limit
    with MemoryCgroup(200 * MiB) as cg:
        cfg.write_text(config_text(tmp_path, cg, audit=str(audit)))
        d = Daemon(cfg, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        try:
            kill_a_hog(d, cg)
            errors = [ln for ln in d.lines if "cannot write to" in ln]
            assert len(errors) == 1 and "EFBIG" in errors[0], errors
        finally:
            assert d.stop() == 0, d.output()[-3000:]
    assert audit.stat().st_size == limit


# --- the metrics port under a hostile local user -------------------------------------------------

HOLDER = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
conns = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(500)]
for i, c in enumerate(conns[:50]):
    c.sendall(b"GET /metrics HTTP/1.1\\r\\n")     # half a request, never finished
print("held", len(conns), flush=True)
sys.stdin.read()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_500_idle_connections_neither_grow_threads_nor_stop_scrapes_or_kills(tmp_path):
    port = _free_port()
    cfg = tmp_path / "c.toml"
    with MemoryCgroup(200 * MiB) as cg:
        cfg.write_text(config_text(tmp_path, cg, listen=f"127.0.0.1:{port}"))
        d = Daemon(cfg)
        holder = None
        try:
            time.sleep(1)
            before = d.threads()
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(port)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline() == "held 500\n"
            time.sleep(1)
            during = d.threads()
            assert during <= before, f"dbguard's threads grew from {before} to {during} with 500 idle connections"
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                assert r.status == 200 and b"dbguard_pressure_level" in r.read()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert json.loads(r.read())["protection_active"] is True
            assert time.monotonic() - t0 < 5
            kill_a_hog(d, cg)
            assert d.threads() <= before
        finally:
            if holder is not None:
                holder.stdin.close()
                holder.wait(10)
            assert d.stop() == 0, d.output()[-3000:]


# --- hostile configs at start and on SIGHUP -------------------------------------------------------

def hostile_configs(tmp: Path) -> dict[str, str]:
    pw = tmp / "world-readable.password"
    pw.write_text("pw\n")
    pw.chmod(0o644)
    deep = "[" * 50_000 + "]" * 50_000
    return {
        "nan interval": "[general]\ninterval = nan\n",
        "nan hysteresis": "[pressure]\nhysteresis = nan\n",
        "inf min_dwell": "[pressure]\nmin_dwell = inf\n",
        "password in a URI": f'[[databases]]\nkind = "postgresql"\ndsn = "postgresql://u:{SECRET}@h/db"\n',
        "password after a quoted value": f'[[databases]]\nkind = "postgresql"\ndsn = "dbname=\'x\'password={SECRET}"\n',
        "malformed URI": f'[[databases]]\nkind = "postgresql"\ndsn = "postgresql://u:{SECRET}%zz@h/db"\n',
        "world-readable password file": f'[[databases]]\nkind = "mysql"\nsocket = "/x.sock"\n'
                                        f'password_file = {_q(pw)}\n',
        "the same server twice": '[[databases]]\nkind = "mysql"\nhost = "h"\n[[databases]]\nkind = "mysql"\n'
                                 'host = "h"\nname = "b"\n',
        "port out of range": '[metrics]\nlisten = "127.0.0.1:99999"\n',
        "dotdot cgroup": '[pressure]\ncgroup = "/sys/fs/cgroup/memory/../x"\n',
        "relative state_dir": '[general]\nstate_dir = "state"\n',
        "state_dir is a file": f'[general]\nstate_dir = {_q(pw)}\n',
        "unknown user": '[kill]\nprotect_users = ["no-such-user-x"]\n',
        "deep nesting": f"[kill]\nprotect_exe = {deep}\n",
    }


def test_hostile_configs_at_start_are_one_line_each_and_exit_2(tmp_path):
    for name, piece in hostile_configs(tmp_path).items():
        cfg = tmp_path / "hostile.toml"
        cfg.write_text(merge(config_text(tmp_path, None), piece))
        r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode == 2, f"{name}: exit {r.returncode}: {out[-2000:]}"
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("dbguard: "), f"{name}: {lines}"
        assert "Traceback" not in out and SECRET not in out, f"{name}: {out}"


def test_hostile_configs_on_sighup_keep_the_running_config(tmp_path):
    cfg = tmp_path / "c.toml"
    with MemoryCgroup(200 * MiB) as cg:
        good = config_text(tmp_path, cg)
        cfg.write_text(good)
        d = Daemon(cfg)
        try:
            for n, (name, piece) in enumerate(hostile_configs(tmp_path).items(), 1):
                cfg.write_text(merge(good, piece))
                os.kill(d.p.pid, signal.SIGHUP)
                d.wait_for(lambda: sum("SIGHUP: config not reloaded" in ln for ln in d.lines) >= n, 15,
                           f"the reload of {name!r} to be refused")
                assert d.p.poll() is None, f"{name}: a refused reload stopped dbguard"
            assert SECRET not in d.output() and "Traceback" not in d.output()
            cfg.write_text(good)
            os.kill(d.p.pid, signal.SIGHUP)
            d.wait_for(lambda: any("reload dbguard: SIGHUP -> config reloaded" in ln for ln in d.lines), 15,
                       "a good reload after the refused ones")
            kill_a_hog(d, cg)             # protection went on all along
        finally:
            assert d.stop() == 0, d.output()[-3000:]


def merge(good: str, piece: str) -> str:
    """`good` with the TOML `piece` put in: a key of a table `good` has replaces its value
    there; other tables and arrays of tables are added."""
    def tables(text: str) -> list[list[str]]:
        out: list[list[str]] = [[]]
        for line in text.splitlines():
            if line.startswith("["):
                out.append([line])
            elif line.strip():
                out[-1].append(line)
        return [t for t in out if t]
    merged = tables(good)
    for table in tables(piece):
        same = next((t for t in merged if t[0] == table[0] and not table[0].startswith("[[")), None)
        if same is None:
            merged.append(table)
            continue
        for line in table[1:]:
            key = line.split("=", 1)[0].strip()
            same[:] = [ln for ln in same if ln.split("=", 1)[0].strip() != key] + [line]
    return "\n".join(line for t in merged for line in t) + "\n"


# --- planted links and foreign directories -------------------------------------------------------

@pytest.fixture
def shared_tmp():
    """A directory the unprivileged user can reach (pytest's own is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="dbguard-harden-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_planted_audit_link_is_refused_at_start(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    logdir = tmp_path / "log"
    logdir.mkdir(mode=0o700)
    (logdir / "audit.jsonl").symlink_to(victim)
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(tmp_path, None, audit=str(logdir / "audit.jsonl")))
    r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == (
        f"dbguard: audit.path: {logdir}/audit.jsonl is a symbolic link; dbguard does not write through links "
        "as root\n"), r.stderr
    assert victim.read_text() == "root's file\n"


@pytest.mark.parametrize("which", ["state", "log"])
def test_a_directory_an_unprivileged_user_owns_is_refused_at_start(shared_tmp, which):
    """nobody owns the directory and plants a link in it: dbguard (root) refuses the directory."""
    victim = shared_tmp / "victim"
    victim.write_text("root's file\n")
    d = shared_tmp / which
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    planted = d / ("originals-x.json" if which == "state" else "audit.jsonl")
    pid = os.fork()
    if pid == 0:                         # the unprivileged user plants the link
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.symlink(victim, planted)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert planted.is_symlink() and os.lstat(planted).st_uid == NOBODY
    cfg = shared_tmp / "c.toml"
    cfg.write_text(config_text(shared_tmp, None, audit=str(shared_tmp / "log" / "audit.jsonl")))
    r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    key = "general.state_dir" if which == "state" else "audit.path"
    assert r.returncode == 2 and r.stderr == (
        f"dbguard: {key}: {d} is owned by uid {NOBODY} (nobody), not root: chown root {d} or use another path\n"
    ), r.stderr
    assert victim.read_text() == "root's file\n"


def test_a_state_dir_link_planted_in_a_sticky_directory_is_refused(shared_tmp):
    """state_dir in a world-writable sticky directory (like /tmp): nobody got there first with a link."""
    sticky = shared_tmp / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    target = shared_tmp / "elsewhere"
    target.mkdir(mode=0o700)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.symlink(target, sticky / "dbguard-state")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    cfg = shared_tmp / "c.toml"
    cfg.write_text(config_text(shared_tmp, None).replace(_q(shared_tmp / "state"), _q(sticky / "dbguard-state")))
    r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(
        f"dbguard: general.state_dir: {sticky}/dbguard-state is a symbolic link owned by uid {NOBODY} (nobody)"), \
        r.stderr
    assert os.listdir(target) == []


def test_as_an_unprivileged_user_a_planted_link_is_refused_too(shared_tmp):
    """dbguard run as nobody, in directories nobody owns: the link is still never followed."""
    base = shared_tmp / "nobody"
    base.mkdir(mode=0o755)
    os.chown(base, NOBODY, NOBODY)
    victim = base / "victim"
    victim.write_text("nobody's file\n")
    os.chown(victim, NOBODY, NOBODY)
    (base / "log").mkdir(mode=0o700)
    os.chown(base / "log", NOBODY, NOBODY)
    os.symlink(victim, base / "log" / "audit.jsonl")
    os.lchown(base / "log" / "audit.jsonl", NOBODY, NOBODY)
    cfg = base / "c.toml"
    cfg.write_text(config_text(base, None, audit=str(base / "log" / "audit.jsonl")))
    os.chown(cfg, NOBODY, NOBODY)

    def drop() -> None:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    r = subprocess.run([*DBGUARD, "run", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       preexec_fn=drop)
    assert r.returncode == 2 and r.stderr.endswith(
        f"dbguard: audit.path: {base}/log/audit.jsonl is a symbolic link; dbguard does not write through links "
        "as root\n"), r.stderr
    assert victim.read_text() == "nobody's file\n"


# --- a hog whose main thread has exited -----------------------------------------------------------

THREAD_EXIT_HOG = """
import ctypes, sys, threading, time
from lab.hog import grow
def run():
    time.sleep(0.5)                          # the main thread is gone by then
    held = grow(190 << 20, 5 << 20, 0.05)
    time.sleep(60)
threading.Thread(target=run).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_hog_whose_main_thread_exited_is_still_killed(tmp_path):
    cfg = tmp_path / "c.toml"
    with MemoryCgroup(200 * MiB) as cg:
        cfg.write_text(config_text(tmp_path, cg))
        d = Daemon(cfg)
        try:
            hog = subprocess.Popen([sys.executable, "-c", THREAD_EXIT_HOG], cwd=ROOT, preexec_fn=cg.preexec(),
                                   stdout=subprocess.DEVNULL)
            kill_a_hog(d, cg, hog)
        finally:
            assert d.stop() == 0, d.output()[-3000:]


# --- a damaged state file at start ------------------------------------------------------------------

def test_a_damaged_state_file_at_start_is_moved_aside_and_protection_starts(tmp_path):
    """Was: exit 2 at start (PostgreSQL's recover() raised on it)."""
    from lab.pgcluster import PgCluster
    cfg = tmp_path / "c.toml"
    with MemoryCgroup(400 * MiB) as cg, PgCluster(settings={"shared_buffers": "32MB"}) as cluster:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        (state / "originals-main.json").write_text('{"step": 2, "settings": {"work_mem": 8388608}}')
        cfg.write_text(config_text(tmp_path, cg, extra=f'[[databases]]\nname = "main"\nkind = "postgresql"\n'
                                                         f'dsn = {_q(cluster.dsn)}\n'))
        d = Daemon(cfg)
        try:
            warnings = [ln for ln in d.lines if "damaged state file" in ln]
            assert len(warnings) == 1 and "moved aside to" in warnings[0], d.output()[-3000:]
            aside = list(state.glob("originals-main.json.damaged-*"))
            assert len(aside) == 1 and not (state / "originals-main.json").exists()
        finally:
            assert d.stop() == 0, d.output()[-3000:]
