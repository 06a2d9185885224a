"""Processes /proc shows oddly, with real processes: a leader thread that exited while other
threads hold the memory, and an executable replaced on disk while it runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbguard.sense import procfs

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

# The main thread calls pthread_exit (ctypes releases the GIL for the call, so the other
# thread runs on); the process lives on in its second thread, which holds HOLD_MIB.
THREAD_EXIT = """
import ctypes, sys, threading, time
held = []
def hold():
    held.append(bytearray(b"\\x01" * ({mib} << 20)))
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    time.sleep(600)
threading.Thread(target=hold).start()
while not held:
    time.sleep(0.01)
ctypes.CDLL(None).pthread_exit(None)
"""
HOLD_MIB = 80


def start_thread_exit_hog(mib: int = HOLD_MIB, **kw) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", THREAD_EXIT.format(mib=mib)], stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 10
    while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the main thread did not exit"
        time.sleep(0.02)
    return p


def test_a_process_whose_main_thread_exited_shows_its_memory_and_executable():
    p = start_thread_exit_hog()
    try:
        # what /proc says of the leader itself: no memory, no executable
        assert "VmRSS" not in Path(f"/proc/{p.pid}/status").read_text()
        with pytest.raises(OSError):
            os.readlink(f"/proc/{p.pid}/exe")
        proc = procfs.read_proc(p.pid)
        assert proc is not None and proc.rss_bytes >= HOLD_MIB * MiB, proc
        assert proc.exe == os.path.realpath(sys.executable)
        assert proc.cmdline.startswith(f"{sys.executable} -c \nimport ctypes") and proc.uid == os.getuid()
        assert proc.memcg == procfs.parse_memcg(Path("/proc/self/cgroup").read_text())[0]
        assert procfs.rss_anon(p.pid) >= HOLD_MIB * MiB
        pss = procfs.read_pss(proc)
        assert pss is not None and pss >= HOLD_MIB * MiB
    finally:
        p.kill()
        p.wait()


def test_it_is_a_kill_candidate_in_explain(tmp_path):
    p = start_thread_exit_hog()
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[general]\ndiscover = false\nstate_dir = "{tmp_path}/state"\n'
                       f'[audit]\npath = "{tmp_path}/audit.jsonl"\n[metrics]\nlisten = ""\n'
                       f'[kill]\nmin_rss = "32MiB"\n')
        r = subprocess.run([sys.executable, "-m", "dbguard.cli", "explain", "-c", str(cfg), "--pid", str(p.pid),
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        row, = json.loads(r.stdout)["processes"]
        assert row["verdict"] == "candidate" and row["rss_bytes"] >= HOLD_MIB * MiB, row
        assert row["exe"] == os.path.realpath(sys.executable)
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("how", ["upgrade", "remove"])
def test_a_replaced_executable_keeps_its_path_and_its_protection(tmp_path, how):
    exe = tmp_path / "bin" / "guarded-daemon"
    exe.parent.mkdir()
    shutil.copy("/bin/sleep", exe)
    p = subprocess.Popen([str(exe), "600"])
    try:
        time.sleep(0.2)
        if how == "upgrade":            # as dpkg does: the new file renamed over the old
            shutil.copy("/bin/sleep", str(exe) + ".dpkg-new")
            os.rename(str(exe) + ".dpkg-new", exe)
        else:
            exe.unlink()
        assert os.readlink(f"/proc/{p.pid}/exe") == f"{exe} (deleted)"
        assert procfs.read_proc(p.pid).exe == str(exe)
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[general]\ndiscover = false\nstate_dir = "{tmp_path}/state"\n'
                       f'[audit]\npath = "{tmp_path}/audit.jsonl"\n[metrics]\nlisten = ""\n'
                       f'[kill]\nprotect_exe = ["{tmp_path}/bin/*"]\n')
        r = subprocess.run([sys.executable, "-m", "dbguard.cli", "explain", "-c", str(cfg), "--pid", str(p.pid),
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        row, = json.loads(r.stdout)["processes"]
        assert row["verdict"] == "protected" and row["exe"] == str(exe), row
    finally:
        p.kill()
        p.wait()


def test_a_file_really_named_deleted_keeps_its_name(tmp_path):
    exe = tmp_path / "odd (deleted)"
    shutil.copy("/bin/sleep", exe)
    p = subprocess.Popen([str(exe), "600"])
    try:
        time.sleep(0.2)
        assert procfs.read_proc(p.pid).exe == str(exe)
    finally:
        p.kill()
        p.wait()
