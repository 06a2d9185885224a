"""Databases in containers without a container runtime: `unshare --mount --pid --fork`.

A Pod is a process tree in its own mount and pid namespaces (its own /proc too), as a
container's is. A host directory (`pod.share`) is bind-mounted at /srv/db inside, over a
private tmpfs on /srv: the database's data directory, socket and pid file are named
/srv/db/... and exist under that name only inside the pod; the pod's first process is its
pid 1, as a container's entrypoint is. From the host the pod's files are reached through
/proc/<host pid>/root (`pod.path`), exactly what dbguard does.

    with PodPostgres(cgroup) as pg:     # initdb and postgres inside the pod, postgres as its pid 1
        pg.psql("SELECT 1")             # through the socket inside the pod's root
        pg.host_pid                     # the postmaster's pid on the host

Stopping signals the pod's pid 1 by its host pid, never a pid read from a pid file: the pid in
/srv/db/.../postmaster.pid is the pod's own (1), and on the host 1 is init.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pymysql

from lab.cgroup import MemoryCgroup
from lab.mariadb import DEFAULT_SETTINGS, INSTALL_DB, SERVER
from lab.pgcluster import PG_BIN

MOUNT = "/srv/db"
_SETUP = ('set -e; mount -t tmpfs -o size=1m,mode=755 dbguard-pod /srv; mkdir /srv/db; '
          'mount --bind "$0" /srv/db; exec "$@"')


class Pod:
    """A process tree in new mount and pid namespaces, with `share` mounted at /srv/db only there."""

    def __init__(self, cgroup: MemoryCgroup | None = None, stop_signal: int = signal.SIGTERM):
        self.cgroup = cgroup
        self.stop_signal = stop_signal
        self.share = tempfile.mkdtemp(prefix="dbguard-pod-", dir="/var/tmp")   # on disk: droppable page cache
        os.chmod(self.share, 0o755)
        self.proc: subprocess.Popen | None = None
        self._init: int | None = None

    def start(self, argv: list[str], user: str | None = None) -> "Pod":
        """Run `argv` as the pod's pid 1 (as `user`, when given)."""
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        with open(os.path.join(self.share, "pod.log"), "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                 "sh", "-c", _SETUP, self.share, *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=self.cgroup.preexec() if self.cgroup else None)
        return self

    @property
    def init_pid(self) -> int:
        """The host pid of the pod's pid 1 (unshare's one child)."""
        if self._init is None:
            deadline = time.monotonic() + 10
            while self._init is None:
                try:
                    kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                except FileNotFoundError:
                    kids = []
                if kids:
                    self._init = int(kids[0])
                elif self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the pod did not start (unshare exit {self.proc.poll()}): {self.log()}")
                else:
                    time.sleep(0.02)
        return self._init

    def path(self, p: str) -> str:
        """The pod's `p` from the host."""
        return f"/proc/{self.init_pid}/root{p}"

    def log(self) -> str:
        try:
            return Path(self.share, "pod.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """The stop signal to the pod's pid 1 (by host pid); when it ends, the kernel ends the
        rest of the pod. SIGKILL to it if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        init = self._init
        if init is not None:
            try:
                os.kill(init, self.stop_signal)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if init is not None:
                try:
                    os.kill(init, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(10)

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.share, ignore_errors=True)

    def wait_for(self, ready, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running():
                raise RuntimeError(f"{what}: the pod exited ({self.proc.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {timeout:g}s: {self.log()}")
            time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


class PodPostgres(Pod):
    """PostgreSQL 15 in a pod: initdb there, then postgres as the pod's pid 1. No TCP: the
    socket /srv/db/sock/.s.PGSQL.5432 (the same path in every pod) is the only way in."""

    DATA = f"{MOUNT}/data"
    SOCKET_DIR = f"{MOUNT}/sock"
    PORT = 5432

    def __init__(self, cgroup: MemoryCgroup | None = None, settings: dict[str, str] | None = None):
        super().__init__(cgroup, stop_signal=signal.SIGINT)    # postgres: SIGINT is fast shutdown
        self.settings = {"listen_addresses": "", "unix_socket_directories": self.SOCKET_DIR,
                         "port": str(self.PORT), "fsync": "off", "synchronous_commit": "off", **(settings or {})}

    @property
    def dsn(self) -> str:
        """The DSN as the pod sees it (what dbguard is configured with, next to namespace_of)."""
        return f"host={self.SOCKET_DIR} port={self.PORT} user=postgres dbname=postgres"

    def __enter__(self) -> "PodPostgres":
        try:
            os.chown(self.share, *_ids("postgres"))
            opts = " ".join(f"-c {k}='{v}'" for k, v in self.settings.items())
            script = (f"mkdir -p {self.SOCKET_DIR} && {PG_BIN}/initdb -D {self.DATA} -U postgres -E UTF8 "
                      f"--locale=C --auth-local=trust -N >{MOUNT}/initdb.log 2>&1 && "
                      f"exec {PG_BIN}/postgres -D {self.DATA} {opts} >{MOUNT}/server.log 2>&1")
            self.start(["sh", "-c", script], user="postgres")
            self.wait_for(self.is_up, "PostgreSQL in a pod")
        except BaseException:
            self.destroy()
            raise
        return self

    def is_up(self) -> bool:
        r = subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", self.path(self.SOCKET_DIR), "-p",
                            str(self.PORT), "-t", "2"], capture_output=True)
        return r.returncode == 0

    @property
    def host_pid(self) -> int:
        """The postmaster (the pod's pid 1) on the host."""
        return self.init_pid

    def psql(self, sql: str) -> str:
        r = subprocess.run([str(PG_BIN / "psql"), "-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-h",
                            self.path(self.SOCKET_DIR), "-p", str(self.PORT), "-U", "postgres", "-d", "postgres",
                            "-c", sql], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"psql in the pod failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.rstrip("\n")


class PodMariaDB(Pod):
    """MariaDB in a pod: mariadb-install-db there, then mariadbd as the pod's pid 1 (it drops
    to the mysql user itself). No TCP: /srv/db/mysqld.sock is the only way in."""

    SOCKET = f"{MOUNT}/mysqld.sock"
    PID_FILE = f"{MOUNT}/mariadbd.pid"
    CNF = f"{MOUNT}/my.cnf"

    def __init__(self, cgroup: MemoryCgroup | None = None, settings: dict[str, Any] | None = None):
        super().__init__(cgroup, stop_signal=signal.SIGTERM)   # mariadbd: SIGTERM is shutdown
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}

    def __enter__(self) -> "PodMariaDB":
        try:
            lines = ["[mysqld]", f"datadir={MOUNT}/data", f"socket={self.SOCKET}", f"pid-file={self.PID_FILE}",
                     f"log-error={MOUNT}/error.log", "skip-networking"]
            lines += [f"{k}={v}" for k, v in self.settings.items()]
            Path(self.share, "my.cnf").write_text("\n".join(lines) + "\n")
            os.chmod(os.path.join(self.share, "my.cnf"), 0o644)
            os.chown(self.share, *_ids("mysql"))
            script = (f"{INSTALL_DB} --defaults-file={self.CNF} --user=mysql --auth-root-authentication-method=normal "
                      f"--skip-test-db >{MOUNT}/install.log 2>&1 && exec {SERVER} --defaults-file={self.CNF} --user=mysql")
            self.start(["sh", "-c", script])
            self.wait_for(self._answers, "MariaDB in a pod")
        except BaseException:
            self.destroy()
            raise
        return self

    def _answers(self) -> bool:
        try:
            self.sql("SELECT 1")
            return True
        except pymysql.err.MySQLError:
            return False

    @property
    def host_pid(self) -> int:
        """mariadbd (the pod's pid 1) on the host."""
        return self.init_pid

    def sql(self, stmt: str, args: Any = None) -> list[tuple]:
        conn = pymysql.connect(unix_socket=self.path(self.SOCKET), user="root", password="", connect_timeout=5,
                               autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(stmt, args)
                return list(cur.fetchall())
        finally:
            conn.close()


def start_pod(kind: str, cg: MemoryCgroup, work: Path, settings: dict[str, Any] | None = None):
    """A database pod in `cg` and its [[databases]] entry for dbguard (namespace_of: the cgroup
    for PostgreSQL, a pid file in `work` for MariaDB, so both forms run; MariaDB's dbguard
    user's password in a file there)."""
    if kind == "postgresql":
        pod = PodPostgres(cg, settings).__enter__()
        return pod, {"kind": "postgresql", "name": "pod-pg", "dsn": pod.dsn, "namespace_of": str(cg.path)}
    pod = PodMariaDB(cg, settings).__enter__()
    pod.sql("CREATE USER dbguard@localhost IDENTIFIED BY 's3cret'")
    pod.sql("GRANT PROCESS, SUPER, CONNECTION ADMIN ON *.* TO dbguard@localhost")
    pw = work / "mysql.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    pid_file = work / "pod.pid"
    pid_file.write_text(f"{pod.host_pid}\n")
    return pod, {"kind": "mysql", "name": "pod-my", "socket": pod.SOCKET, "user": "dbguard",
                 "password_file": str(pw), "namespace_of": str(pid_file)}


def _ids(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid
