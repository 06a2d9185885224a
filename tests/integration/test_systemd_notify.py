"""Type=notify and WatchdogSec in integrations/systemd/dbguard.service rely on `dbguard run`
sending READY=1, WATCHDOG=1 and STOPPING=1 to $NOTIFY_SOCKET. This machine has no systemd as
PID 1, so the test plays systemd's part: it binds the datagram socket, sets NOTIFY_SOCKET and
WATCHDOG_USEC as systemd does, and reads what arrives."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

from lab.launcher import REPO, audit_records, base_config, dbguard_command, toml

# interval = 60: without the watchdog capping the wait, a second WATCHDOG=1 would come a
# minute later; with WatchdogSec=2 s dbguard must feed it at least every second.
INTERVAL = 60.0
WATCHDOG_USEC = 2_000_000


def test_ready_after_start_watchdog_fed_faster_than_the_interval_and_stopping(tmp_path):
    cfg = base_config(tmp_path)
    cfg["general"] = {**cfg["general"], "interval": INTERVAL, "discover": False, "lock_memory": False}
    cfg["bpf"] = {"enabled": False}
    config = tmp_path / "dbguard.toml"
    config.write_text(toml(cfg))
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen(dbguard_command("run", "--config", str(config), "--dry-run"), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert sock.recv(256) == b"READY=1"
            # READY=1 means protecting: the start record is already written
            assert [r for r in audit_records(tmp_path / "audit.jsonl") if r["action"] == "start"]
            assert [sock.recv(256) for _ in range(3)] == [b"WATCHDOG=1"] * 3
            proc.send_signal(signal.SIGTERM)
            rest = []
            while (msg := sock.recv(256)) != b"STOPPING=1":
                rest.append(msg)
            assert set(rest) <= {b"WATCHDOG=1"}, rest
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


def test_no_notify_socket_no_notification(tmp_path):
    """Outside systemd (no NOTIFY_SOCKET) sd_notify is a no-op that says so."""
    from dbguard.host import sd_notify, watchdog_interval
    saved = {k: os.environ.pop(k, None) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    try:
        assert sd_notify("READY=1") is False
        assert watchdog_interval() is None
        os.environ["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
        os.environ["WATCHDOG_PID"] = str(os.getpid() + 1)      # another process is watched
        assert watchdog_interval() is None
        os.environ["WATCHDOG_PID"] = str(os.getpid())
        assert watchdog_interval() == WATCHDOG_USEC / 2e6
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
