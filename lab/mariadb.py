"""Throwaway MariaDB servers for tests and demos.

Each server gets its own temp directory (datadir, socket, pid file, my.cnf, error log),
a free TCP port on 127.0.0.1, runs as the `mysql` OS user (mariadbd drops root itself via
--user, so it can join a memory cgroup before exec), and is removed completely by
destroy() / the context manager, also when start() fails half-way.

Also here: the read workload the MariaDB scenarios run against it (`load_table`,
`ReadLoad`: range reads from client processes, counted per second like `pgbench -P 1`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
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

    DBGUARD_USER = "dbguard"

    def __init__(self, settings: dict[str, Any] | None = None, cgroup: MemoryCgroup | None = None,
                 start_timeout: float = 60.0):
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.cgroup = cgroup
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.starts: list[tuple[float, int]] = []     # (time.monotonic() when ready, pid), every start
        self.dbguard_password: str | None = None      # set by grant_dbguard()

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
                self._new_port()
            self._spawn()
        except BaseException:
            self.destroy()
            raise
        return self

    def respawn(self) -> int:
        """Start mariadbd again on the existing datadir, as a supervisor would after a crash
        (systemd's Restart=): InnoDB runs crash recovery. Unlike start(), a failure removes
        nothing, so the caller may try again. Returns the new pid."""
        if self.running():
            raise RuntimeError("mariadbd is still running")
        self._new_port()
        self._spawn()
        return self.proc.pid

    def _new_port(self) -> None:
        self.port = free_port()       # a restart may find the old port taken
        self._write_cnf()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [SERVER, f"--defaults-file={self.cnf}", f"--user={OS_USER}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=self.cgroup.preexec() if self.cgroup else None)
        self._wait_ready()
        self.starts.append((time.monotonic(), self.proc.pid))

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

    def grant_dbguard(self, password: str = "s3cret") -> None:
        """The dbguard@localhost user with the grants docs/mysql.md lists (DBGUARD_GRANTS)."""
        self.create_user(self.DBGUARD_USER, password, DBGUARD_GRANTS, host="localhost")
        self.dbguard_password = password


# --- the scenarios' workload -----------------------------------------------------------------

# Grants dbguard needs on MariaDB (docs/mysql.md): see sessions, resize the pool, end sessions.
DBGUARD_GRANTS = ("PROCESS", "SUPER", "CONNECTION ADMIN")
RANGE_SQL = "SELECT SUM(LENGTH(pad)) FROM w.t WHERE id BETWEEN %s AND %s"
_CONNECTION_LOST = {2002, 2003, 2006, 2013, 2055}     # CR_* codes: no server, gone away, lost


def load_table(db: MariaDB, rows: int) -> None:
    """w.t: `rows` rows of id INT PRIMARY KEY, pad CHAR(255): ~310 MiB of InnoDB pages per
    million rows (measured: 19,700 16-KiB pages)."""
    db.sql("CREATE DATABASE IF NOT EXISTS w")
    db.sql("CREATE TABLE w.t (id INT PRIMARY KEY, pad CHAR(255)) ENGINE=InnoDB")
    db.sql(f"INSERT INTO w.t SELECT seq, REPEAT('x', 255) FROM w.seq_1_to_{int(rows)}")


@dataclass
class LoadSummary:
    queries_ok: int = 0
    queries_failed: int = 0            # sent and not answered: an error, or the connection lost mid-query
    sessions_lost: int = 0             # connections the server dropped (killed, gone away, restarted)
    reconnects: int = 0                # successful connects after a lost one
    connect_failures: int = 0          # connect attempts refused while the server was down
    progress: list[tuple[float, float]] = field(default_factory=list)   # (second's end since start, queries/s)
    errors: list[str] = field(default_factory=list)                     # first few, "+12.3s: message"


def _client(kw: dict, rows: int, span: int, t_start: float, stop: threading.Event, reconnect: bool) -> dict:
    """One client: range reads until `stop` is set; returns its counts."""
    per_second: Counter = Counter()
    res: dict = {"ok": 0, "failed": 0, "lost": 0, "reconnects": 0, "connect_failures": 0, "errors": []}
    conn = None
    ever_connected = False

    def err(msg: str) -> None:
        if len(res["errors"]) < 5:
            res["errors"].append(f"+{time.monotonic() - t_start:.1f}s: {msg}")
    while not stop.is_set():
        if conn is None:
            try:
                conn = pymysql.connect(**kw, autocommit=True)
            except pymysql.err.MySQLError as e:
                res["connect_failures"] += 1
                if not ever_connected:
                    err(f"connect: {e}")
                if not reconnect and ever_connected:
                    break
                stop.wait(0.2)
                continue
            res["reconnects"] += ever_connected
            ever_connected = True
        lo = random.randint(1, max(1, rows - span))
        try:
            with conn.cursor() as cur:
                cur.execute(RANGE_SQL, (lo, lo + span - 1))
                cur.fetchall()
            res["ok"] += 1
            per_second[int(time.monotonic() - t_start)] += 1
        except (pymysql.err.MySQLError, OSError) as e:
            res["failed"] += 1
            err(str(e))
            code = e.args[0] if isinstance(e, pymysql.err.MySQLError) and e.args else None
            if isinstance(e, (pymysql.err.InterfaceError, OSError)) or code in _CONNECTION_LOST:
                res["lost"] += 1
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                if not reconnect:
                    break
                stop.wait(0.2)
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
    res["per_second"] = {str(k): v for k, v in per_second.items()}
    return res


def _client_main() -> None:
    """`python -c 'from lab.mariadb import _client_main; _client_main()' JSON`: one client
    process; it stops at SIGTERM (after its query) and prints its counts as JSON."""
    args = json.loads(sys.argv[1])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    res = _client(args["kw"], args["rows"], args["span"], args["t_start"], stop, args["reconnect"])
    print(json.dumps(res), flush=True)


class SessionMemory(threading.Thread):
    """The most memory the server's sessions held at once by its own accounting
    (information_schema.PROCESSLIST MEMORY_USED, summed), polled every `every` s from a
    connection of the test's own: what the sessions asked for, whether or not the cgroup was
    charged for it before a guard ended them. Stops polling when the server goes."""

    def __init__(self, db: "MariaDB", every: float = 0.02):
        super().__init__(daemon=True)
        self._kw, self._every = db.connect_kwargs(), every
        self._done = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        try:
            with contextlib.closing(pymysql.connect(**self._kw, autocommit=True)) as conn, conn.cursor() as cur:
                while not self._done.wait(self._every):
                    cur.execute("SELECT COALESCE(SUM(MEMORY_USED), 0) FROM information_schema.PROCESSLIST "
                                "WHERE ID <> CONNECTION_ID()")
                    self.peak_bytes = max(self.peak_bytes, int(cur.fetchone()[0]))
        except pymysql.MySQLError:
            return

    def stop(self) -> int:
        self._done.set()
        self.join(10)
        return self.peak_bytes


class ReadLoad:
    """Range reads over w.t (`span` rows from a random id) by `clients` processes started
    outside the database's cgroup, as pgbench -S is in the PostgreSQL scenarios.

    Each process counts its queries per second since start() (like pgbench -P 1), the
    queries that failed and the connections it lost. With reconnect=True a client whose
    connection dropped connects again every 0.2 s and goes on, as an application's pool
    would: a restarted server then shows in the throughput again. Processes, not threads:
    the clients must not share one Python interpreter's lock."""

    def __init__(self, db: MariaDB, rows: int, *, clients: int = 4, span: int = 100,
                 reconnect: bool = True, read_timeout: float = 30.0):
        self.kw = {**db.connect_kwargs(), "read_timeout": read_timeout, "write_timeout": read_timeout}
        self.rows, self.clients, self.span, self.reconnect = rows, clients, span, reconnect
        self.read_timeout = read_timeout
        self._procs: list[subprocess.Popen] = []
        self.t_start: float | None = None

    def start(self) -> "ReadLoad":
        self.t_start = time.monotonic()      # CLOCK_MONOTONIC: the same clock in every process
        arg = json.dumps({"kw": self.kw, "rows": self.rows, "span": self.span, "t_start": self.t_start,
                          "reconnect": self.reconnect})
        repo = str(Path(__file__).resolve().parent.parent)
        for _ in range(self.clients):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-c", "from lab.mariadb import _client_main; _client_main()", arg],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=repo,
                text=True, start_new_session=True))
        return self

    def stop(self) -> LoadSummary:
        """Stop the clients (each finishes its query) and add up what they counted."""
        for p in self._procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()        # our own client process: it stops after its query
        s = LoadSummary()
        per_second: Counter = Counter()
        for p in self._procs:
            try:
                out, err = p.communicate(timeout=self.read_timeout + 10)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            try:
                res = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                s.errors.append(f"client pid {p.pid} reported nothing (exit {p.returncode}): "
                                f"{(err or '').strip().splitlines()[-1:] }")
                continue
            s.queries_ok += res["ok"]
            s.queries_failed += res["failed"]
            s.sessions_lost += res["lost"]
            s.reconnects += res["reconnects"]
            s.connect_failures += res["connect_failures"]
            s.errors += res["errors"][: max(0, 10 - len(s.errors))]
            per_second.update({int(k): v for k, v in res["per_second"].items()})
        self._procs = []
        last = max(per_second, default=-1)
        s.progress = [(float(k + 1), float(per_second.get(k, 0))) for k in range(last + 1)]
        return s

    def running(self) -> bool:
        """Every client process still runs."""
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def __enter__(self) -> "ReadLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._procs:
            self.stop()
