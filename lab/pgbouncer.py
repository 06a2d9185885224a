"""A throwaway PgBouncer in front of a lab PostgreSQL (never the system's pgbouncer service):
its own temp directory (pgbouncer.ini, userlist, socket, log), a free port on 127.0.0.1,
transaction pooling, trust auth, run as the postgres OS user (PgBouncer refuses root), removed
by stop() / the context manager.

    with PgBouncer(pg, pool_size=8) as b:
        b.dsn("app")          # clients: the database "app" through the pooler
        b.admin_dsn           # the admin console, for dbguard ([[poolers]] dsn)
        b.show("CONFIG")      # psql against the console: the tests' oracle
        with Clients(b.dsn("app"), 10, "SELECT 1") as c: ...   # clients through it, back to back
        with logins_held(pg): ...   # server logins PgBouncer starts now stay in their login
"""
from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dbguard.errors import DbguardError

from . import servers
from .mariadb import free_port
from .pgcluster import PG_BIN, PgCluster

SERVER = "/usr/sbin/pgbouncer"
OS_USER = "postgres"
ADMIN = "dbguard"


def require() -> None:
    if os.geteuid() != 0:
        raise DbguardError("a throwaway PgBouncer needs root (it runs as the postgres OS user): run as root")
    if not Path(SERVER).exists():
        raise DbguardError("pgbouncer not installed: apt-get install pgbouncer (or run `make setup`)")


class PgBouncer:
    def __init__(self, pg: PgCluster, pool_size: int = 8, max_db_connections: int = 0,
                 settings: dict[str, str] | None = None):
        self.pg, self.pool_size, self.max_db = pg, pool_size, max_db_connections
        self.settings = settings or {}          # more [pgbouncer] lines, e.g. query_wait_timeout
        self.dir: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PgBouncer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def socket_dir(self) -> str:
        return str(self.dir)

    @property
    def admin_dsn(self) -> str:
        return f"host={self.dir} port={self.port} dbname=pgbouncer user={ADMIN}"

    def dsn(self, dbname: str = "app") -> str:
        return f"host={self.dir} port={self.port} dbname={dbname} user=postgres"

    def start(self) -> "PgBouncer":
        user = pwd.getpwnam(OS_USER)
        self.dir = Path(tempfile.mkdtemp(prefix="dbguard-pgbouncer-"))
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        (self.dir / "userlist.txt").write_text(f'"postgres" ""\n"{ADMIN}" ""\n')
        (self.dir / "pgbouncer.ini").write_text("\n".join([
            "[databases]",
            f"app = host={self.pg.socket_dir} port={self.pg.port} dbname=postgres",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1", f"listen_port = {self.port}", f"unix_socket_dir = {self.dir}",
            "auth_type = trust", f"auth_file = {self.dir / 'userlist.txt'}", f"admin_users = {ADMIN}",
            "pool_mode = transaction", f"default_pool_size = {self.pool_size}",
            f"max_db_connections = {self.max_db}", "max_client_conn = 500",
            f"logfile = {self.dir / 'pgbouncer.log'}", f"pidfile = {self.dir / 'pgbouncer.pid'}",
            *(f"{k} = {v}" for k, v in self.settings.items()), ""]))
        for f in self.dir.iterdir():
            os.chown(f, user.pw_uid, user.pw_gid)

        self.proc = servers.spawn([SERVER, str(self.dir / "pgbouncer.ini")], user)
        try:
            servers.wait_up(self.proc, lambda: self.show("VERSION"), 15, "pgbouncer", (RuntimeError,), self.log)
        except RuntimeError:
            self.stop()
            raise
        return self

    def log(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def show(self, what: str) -> list[dict[str, str]]:
        """SHOW <what> on the admin console through psql (not dbguard's client): rows as dicts."""
        r = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-F", "\t", "-P", "footer=off", "-h", str(self.dir),
                            "-p", str(self.port), "-U", ADMIN, "-d", "pgbouncer", "-c", f"SHOW {what}"],
                           capture_output=True, text=True, timeout=20, env={"PATH": os.environ.get("PATH", "")})
        if r.returncode != 0:
            raise RuntimeError(f"SHOW {what}: {r.stderr.strip()}")
        lines = r.stdout.splitlines()
        head = lines[0].split("\t") if lines else []
        return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]

    def config(self, key: str) -> str:
        return next(row["value"] for row in self.show("CONFIG") if row["key"] == key)

    def stop(self) -> None:
        servers.stop(self.proc, self.dir)


class Clients:
    """`n` clients through the pooler, each on its own connection running `sql` back to back
    (`once`: a single time): every query's (start, end) on the monotonic clock, and every error
    (a client stops at its first)."""

    def __init__(self, dsn: str, n: int, sql: str, once: bool = False):
        self.dsn, self.sql, self.once = dsn, sql, once
        self.queries: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        import psycopg
        try:
            with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as c:
                while not self.done.is_set():
                    t0 = time.monotonic()
                    c.execute(self.sql).fetchone()
                    self.queries.append((t0, time.monotonic()))
                    if self.once:
                        break
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}"[:300])

    def start(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __enter__(self) -> "Clients":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)

    @property
    def ok(self) -> int:
        return len(self.queries)

    def latencies(self, start: float, end: float) -> list[float]:
        """Seconds each query took that started in [start, end): its wait in the pooler's queue
        and its run."""
        return sorted(e - s for s, e in list(self.queries) if start <= s < end)


@contextmanager
def logins_held(pg: PgCluster) -> Iterator[None]:
    """While inside, a new connection to `pg` stays in its login: a superuser's transaction
    holds pg_database and pg_authid in ACCESS EXCLUSIVE mode, and a backend starting up reads
    its database's row (InitPostgres) and its role from them under ACCESS SHARE locks
    (PostgreSQL 15 has no login hook, and auth_delay delays failed logins only). Connections
    already open go on: they read neither again. Keep it short: PgBouncer gives up a login
    after server_connect_timeout (15 s)."""
    import psycopg
    with psycopg.connect(pg.dsn) as holder:
        holder.execute("LOCK TABLE pg_catalog.pg_database, pg_catalog.pg_authid IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            holder.rollback()
