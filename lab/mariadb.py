"""Throwaway MariaDB servers for tests and demos.

Each server gets its own temp directory (datadir, socket, pid file, my.cnf, error log),
a free TCP port on 127.0.0.1, runs as the `mysql` OS user (mariadbd drops root itself via
--user, so it can join a memory cgroup before exec), and is removed completely by
destroy() / the context manager, also when start() fails half-way.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pymysql

from .cgroup import MemoryCgroup

INSTALL_DB = "mariadb-install-db"
SERVER = "/usr/sbin/mariadbd"
OS_USER = "mysql"

# Small and quick to start: the system server keeps running next to these.
DEFAULT_SETTINGS: dict[str, Any] = {
    "innodb_buffer_pool_size": "128M",
    "innodb_log_file_size": "16M",
    "innodb_flush_log_at_trx_commit": 2,
    "performance_schema": "OFF",
    "skip_name_resolve": "ON",
    "max_connections": 50,
    "table_open_cache": 400,
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MariaDB:
    """One throwaway mariadbd. `with MariaDB(settings={...}) as db: db.sql("SELECT 1")`."""

    def __init__(self, settings: dict[str, Any] | None = None, cgroup: MemoryCgroup | None = None,
                 start_timeout: float = 60.0):
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.cgroup = cgroup
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None

    # --- paths -----------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        return self._dir / "data"

    @property
    def socket(self) -> str:
        return str(self._dir / "mysqld.sock")

    @property
    def pid_file(self) -> Path:
        return self._dir / "mariadbd.pid"

    @property
    def error_log(self) -> Path:
        return self._dir / "error.log"

    @property
    def cnf(self) -> Path:
        return self._dir / "my.cnf"

    @property
    def _dir(self) -> Path:
        if self.dir is None:
            raise RuntimeError("MariaDB: not created yet (call start())")
        return self.dir

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "MariaDB":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def _create(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dbguard-mariadb-"))
        pw = pwd.getpwnam(OS_USER)
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        self._write_cnf()
        r = subprocess.run(
            [INSTALL_DB, f"--defaults-file={self.cnf}", f"--user={OS_USER}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{INSTALL_DB} failed ({r.returncode}): {r.stdout[-2000:]}")

    def _write_cnf(self) -> None:
        lines = ["[mysqld]",
                 f"datadir={self.datadir}",
                 f"socket={self.socket}",
                 f"pid-file={self.pid_file}",
                 f"log-error={self.error_log}",
                 f"port={self.port}",
                 "bind-address=127.0.0.1"]
        lines += [f"{k}={v}" for k, v in self.settings.items()]
        self.cnf.write_text("\n".join(lines) + "\n")
        self.cnf.chmod(0o644)

    def start(self) -> "MariaDB":
        """Create the datadir on first use, then start and wait until it answers."""
        try:
            if self.dir is None:
                self._create()
            else:
                self.port = free_port()   # a restart may find the old port taken
                self._write_cnf()
            self.proc = subprocess.Popen(
                [SERVER, f"--defaults-file={self.cnf}", f"--user={OS_USER}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=self.cgroup.preexec() if self.cgroup else None)
            self._wait_ready()
        except BaseException:
            self.destroy()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.sql("SELECT 1")
                return
            except pymysql.err.MySQLError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd not ready after {self.start_timeout}s: {self.log_tail()}")
                time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> None:
        """Clean shutdown (SIGTERM is mariadbd's documented shutdown request); SIGKILL only if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int:
        if not self.running():
            raise RuntimeError("mariadbd is not running")
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            return " | ".join(self.error_log.read_text().splitlines()[-n:])
        except OSError:
            return "(no error log)"

    # --- SQL -------------------------------------------------------------------------------
    def connect_kwargs(self, user: str = "root", password: str = "", tcp: bool = False) -> dict[str, Any]:
        """Arguments for pymysql.connect(); over the socket unless tcp=True."""
        kw: dict[str, Any] = {"user": user, "password": password, "connect_timeout": 5}
        if tcp:
            kw.update(host="127.0.0.1", port=self.port)
        else:
            kw["unix_socket"] = self.socket
        return kw

    def connect(self, **kw) -> pymysql.connections.Connection:
        return pymysql.connect(**{**self.connect_kwargs(), **kw}, autocommit=True)

    def sql(self, stmt: str, args: Any = None) -> list[tuple]:
        """Run one statement as root, return all rows."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(stmt, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def value(self, stmt: str, args: Any = None) -> Any:
        rows = self.sql(stmt, args)
        return rows[0][0] if rows else None

    def create_user(self, name: str, password: str, grants: tuple[str, ...] | list[str],
                    host: str = "%") -> None:
        """A user with exactly `grants` (global privileges, e.g. ["PROCESS", "CONNECTION ADMIN"])."""
        self.sql("CREATE OR REPLACE USER %s@%s IDENTIFIED BY %s", (name, host, password))
        if grants:
            self.sql(f"GRANT {', '.join(grants)} ON *.* TO %s@%s", (name, host))
        # performance_schema and sys are read through SELECT on them, not a global privilege.
        for schema in ("performance_schema", "sys"):
            if self.value("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name=%s", (schema,)):
                self.sql(f"GRANT SELECT ON `{schema}`.* TO %s@%s", (name, host))
