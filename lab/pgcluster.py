"""A throwaway PostgreSQL 15 cluster in a temp dir, for tests, benchmarks and the demo.

initdb refuses to run as root, so every server-side command runs as the `postgres` OS user
in a temp dir it owns. The socket lives inside the temp dir and TCP is 127.0.0.1 only, so a
cluster never collides with the system server. Local (socket) connections are trusted;
TCP connections need a password (scram-sha-256), which lets tests exercise password errors.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.cgroup import MemoryCgroup

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


class PgCluster:
    def __init__(self, port: int | None = None, settings: dict[str, str] | None = None,
                 cgroup: "MemoryCgroup | None" = None, base_dir: str | None = None):
        if os.geteuid() != 0:
            raise RuntimeError("PgCluster needs root: initdb and the server run as the postgres OS user")
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 server binaries missing in {PG_BIN}: apt-get install postgresql-15")
        try:
            self._pw = pwd.getpwnam(OS_USER)
        except KeyError:
            raise RuntimeError(f"no {OS_USER} OS user: apt-get install postgresql-15 creates it") from None
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.settings = dict(settings or {})
        self.cgroup = cgroup
        self.base_dir = tempfile.mkdtemp(prefix="dbguard-pg-", dir=base_dir or "/tmp")
        os.chown(self.base_dir, self._pw.pw_uid, self._pw.pw_gid)
        os.chmod(self.base_dir, 0o755)
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = os.path.join(self.base_dir, "sock")
        self.log_path = os.path.join(self.base_dir, "server.log")
        self._initialized = False
        self._destroyed = False
        # A test that dies before destroy() must still not leave a server running.
        atexit.register(self.destroy)

    # --- connection strings ----------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, user: str, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user={user} dbname={dbname}"

    def tcp_dsn_for(self, user: str, dbname: str = "postgres") -> str:
        """Over 127.0.0.1, where the server asks for a password (scram-sha-256)."""
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"

    # --- running things as the postgres user -----------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=self.base_dir, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        return env

    def _as_postgres(self, join_cgroup: bool = False):
        """preexec_fn: join the cgroup while still root (cgroup.procs is root's), then drop to postgres."""
        uid, gid = self._pw.pw_uid, self._pw.pw_gid
        procs = str(self.cgroup.path / "cgroup.procs") if (join_cgroup and self.cgroup) else None

        def preexec() -> None:
            if procs:
                with open(procs, "w") as f:
                    f.write("0")
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        return preexec

    def _run(self, args: list[str], join_cgroup: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.base_dir, env=self._env(), preexec_fn=self._as_postgres(join_cgroup),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    # --- lifecycle -------------------------------------------------------------------------
    def _initdb(self) -> None:
        r = self._run([str(PG_BIN / "initdb"), "-D", self.data_dir, "-U", "postgres", "-E", "UTF8",
                       "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "-N"])
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        os.makedirs(self.socket_dir, exist_ok=True)
        os.chown(self.socket_dir, self._pw.pw_uid, self._pw.pw_gid)
        os.chmod(self.socket_dir, 0o755)
        self._initialized = True

    def _write_conf(self) -> None:
        base = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %b ",
            # Throwaway data: no need to wait on the disk the other engineers share.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        base.update(self.settings)
        lines = [f"{k} = {_conf_value(v)}" for k, v in base.items()]
        # Our own file, included last: re-running it on a port retry replaces, not appends.
        Path(self.data_dir, "dbguard-lab.conf").write_text("\n".join(lines) + "\n")
        conf = Path(self.data_dir, "postgresql.conf")
        text = conf.read_text()
        if "include = 'dbguard-lab.conf'" not in text:
            conf.write_text(text + "\ninclude = 'dbguard-lab.conf'\n")

    def start(self) -> "PgCluster":
        if self._destroyed:
            raise RuntimeError("PgCluster already destroyed")
        if self.is_up():
            return self
        if not self._initialized:
            self._initdb()
        for attempt in range(5):
            self._write_conf()
            r = self._run([str(PG_BIN / "pg_ctl"), "-D", self.data_dir, "-l", self.log_path, "-w", "-t", "60",
                           "start"], join_cgroup=True, timeout=90)
            if r.returncode == 0 and self.is_up():
                return self
            tail = self._log_tail()
            self._kill_leftovers()
            if self._auto_port and "could not bind" in tail and attempt < 4:
                self.port = free_port()     # someone took the port between our probe and the bind
                continue
            raise RuntimeError(f"PostgreSQL in {self.data_dir} did not start (pg_ctl exit {r.returncode}: "
                               f"{r.stderr.strip()[-500:]}); server log tail:\n{tail}")
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; idempotent. Falls back to immediate, then SIGKILL of what is left."""
        if not os.path.isdir(self.data_dir):
            return
        if os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
            for m in (mode, "immediate"):
                r = self._run([str(PG_BIN / "pg_ctl"), "-D", self.data_dir, "-m", m, "-w", "-t", "30", "stop"],
                              timeout=45)
                if r.returncode == 0:
                    break
        self._kill_leftovers()

    def destroy(self) -> None:
        if self._destroyed:
            return
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._destroyed = True
            atexit.unregister(self.destroy)

    def __enter__(self) -> "PgCluster":
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc) -> None:
        self.destroy()

    # --- leftovers -------------------------------------------------------------------------
    def _processes(self) -> list[int]:
        """Every process of this cluster: PostgreSQL processes chdir to the data directory, and
        orphans of a crashed postmaster keep that cwd, so the cwd finds them all."""
        data = os.path.realpath(self.data_dir)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/cwd") == data:
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def _kill_leftovers(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in self._processes() if p != os.getpid()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of {self.data_dir} survive SIGKILL: {pids}")
            time.sleep(0.05)

    # --- inspection ------------------------------------------------------------------------
    def postmaster_pid(self) -> int:
        with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
            return int(f.readline())

    def system_identifier(self) -> str:
        """From pg_controldata (the control file on disk): a witness independent of dbguard's SQL."""
        r = self._run([str(PG_BIN / "pg_controldata"), "-D", self.data_dir])
        for line in r.stdout.splitlines():
            if line.startswith("Database system identifier:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError(f"pg_controldata printed no system identifier ({r.returncode}): {r.stderr.strip()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def is_up(self) -> bool:
        if not os.path.isdir(self.socket_dir):
            return False
        r = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", self.socket_dir, "-p", str(self.port),
                            "-t", "5"], env=self._env(), capture_output=True)
        return r.returncode == 0

    def psql(self, sql: str, user: str = "postgres", dbname: str = "postgres") -> str:
        r = subprocess.run([str(PG_BIN / "psql"), "-X", "-Atq", "-v", "ON_ERROR_STOP=1",
                            "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", dbname, "-c", sql],
                           env=self._env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}) on {sql[:200]!r}: {r.stderr.strip()}")
        return r.stdout.rstrip("\n")

    # --- load ------------------------------------------------------------------------------
    def _pgbench_args(self, dbname: str) -> list[str]:
        return [str(PG_BIN / "pgbench"), "-h", self.socket_dir, "-p", str(self.port), "-U", "postgres"]

    def pgbench_init(self, scale: int, dbname: str = "postgres") -> None:
        r = self._run(self._pgbench_args(dbname) + ["-i", "-q", "-s", str(scale), dbname], timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed ({r.returncode}): {r.stderr.strip()[-1000:]}")

    def pgbench(self, *args: str, dbname: str = "postgres") -> subprocess.Popen:
        return subprocess.Popen(self._pgbench_args(dbname) + list(args) + [dbname], cwd=self.base_dir,
                                env=self._env(), preexec_fn=self._as_postgres(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
