"""The one way dbguard talks to a PostgreSQL server: connect, run bounded, close on error.

One persistent psycopg 3 connection (autocommit, application_name=dbguard, statement_timeout
on every connection), reopened when broken. Connecting is retried with a short backoff but
bounded by about 2 x connect_timeout, and every call runs in a worker thread waited for at
most `budget` seconds (databases/bounded.py): protection must never stall on SQL.
"""
from __future__ import annotations

import re
import threading
from typing import Any, Callable, TypeVar

from ...settings import DatabaseConfig
from ...errors import DbguardError
from ...dsn import parse_dsn
from ..bounded import BoundedCaller, Busy, Overdue
from ..namespaces import HOST, Host, Locator
from ..retry import exponential, retry
from .driver import psycopg, sql     # without Python's ssl module

T = TypeVar("T")

# Connection errors no retry can fix: the next attempt would fail the same way.
_PERMANENT = ("password authentication failed", "does not exist", "no pg_hba.conf entry", "no password supplied")


def connect_error_line(message: str, where: str, password: str | None) -> str:
    """One line for a failed connection: what went wrong, where, and what to do."""
    text = " ".join(message.split())
    for prefix in ("connection failed:",):
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
    # libpq: 'connection to server at "h", port p failed: FATAL:  reason'
    reason = text.split(" failed: ", 1)[1] if " failed: " in text else text
    reason = re.sub(r"^(FATAL|ERROR):\s*", "", reason)
    low = reason.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        reason = reason.split(" connection to server")[0]
        hint = "check password_file / password_env"
    elif "no such file or directory" in low or "connection refused" in low:
        reason = "connection refused"
        hint = "is PostgreSQL running?"
    elif "timeout" in low:
        reason = "timed out"
        hint = "is the server reachable? (connect_timeout)"
    elif "no pg_hba.conf entry" in low:
        hint = "add a pg_hba.conf entry for dbguard"
    elif "does not exist" in low:
        hint = "check the user and dbname in dsn"
    elif "starting up" in low or "shutting down" in low or "recovery" in low:
        hint = "wait until the server is up"
    else:
        hint = "check dsn"
    reason = reason.split(" Is the server running")[0].rstrip(". ")
    line = f"cannot connect to {where}: {reason}; {hint}"
    if password:
        line = line.replace(password, "***")
    return line


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Connection:
    """The persistent connection and what it learnt about the server when it opened."""

    def __init__(self, cfg: DatabaseConfig):
        self.cfg = cfg
        info, problems = parse_dsn(cfg.dsn, f"databases.{cfg.name}.dsn")   # libpq's errors quote the DSN
        if info is None:
            raise DbguardError(problems[0])
        self.where = f"host={info.get('host', '/var/run/postgresql')} port={info.get('port', 5432)}" + (
            f" (namespace_of {cfg.namespace_of})" if cfg.namespace_of else "")
        # A server in a container: its socket directory as the container sees it, reached
        # through the container's root (validate.py requires host=/directory with namespace_of).
        self._hosts = [h.strip() for h in info.get("host", "").split(",")]
        self.namespace = Locator(cfg.namespace_of, self._hosts[0])
        self.data_directory = cfg.data_directory    # from SHOW data_directory once connected
        self.system_identifier = ""                 # pg_control_system(), read at every connect
        self.superuser = False
        self.block_size = 8192
        self.has_buffercache = False
        self.conn: psycopg.Connection | None = None
        self.opened = 0                              # connections opened so far (a new one: a (re)started server)
        self._calls = BoundedCaller(f"dbguard-pg-{cfg.name}")
        self._lock = threading.Lock()

    @property
    def budget(self) -> float:
        """Longest one call may block: connecting (retries included) is bounded by about
        2 x connect_timeout, and a statement by statement_timeout, but only while the server
        answers at all; a stopped server or a silent network is cut off here."""
        return max(2 * self.cfg.connect_timeout, self.cfg.statement_timeout) + 0.5

    def stuck_for(self) -> float | None:
        """Seconds an abandoned call has been waiting for the server; None when none is."""
        return self._calls.running_for()

    @property
    def user(self) -> str:
        return self.conn.info.user if self.conn is not None else "dbguard"

    def run(self, work: Callable[[psycopg.Connection], T], budget: float | None = None) -> T:
        """work(conn) in a worker thread, waited for at most `budget` seconds (default: the
        longest a connect or a statement may legitimately take).

        psycopg waits for the server without a client-side limit, and statement_timeout is
        enforced by the server: neither helps when the server stops answering. A worker that
        did not come back keeps the connection: the next calls fail at once while it still
        waits, and use the connection again once it is back (connection.broken says whether
        it still can be).
        """
        budget = self.budget if budget is None else min(budget, self.budget)
        with self._lock:
            try:
                return self._calls.call(lambda: self._retry_once(work), budget)
            except Busy:
                raise DbguardError(f"{self.where}: no answer for {self._calls.running_for() or 0:.0f}s to an "
                                   "earlier statement; is the server stopped, hung or unreachable?") from None
            except Overdue:
                raise DbguardError(f"{self.where}: no answer within {budget:.1f}s; "
                                   "is the server stopped, hung or unreachable?") from None

    def _retry_once(self, work: Callable[[psycopg.Connection], T]) -> T:
        """work(conn) on the persistent connection; once more on a new one if the old one was lost
        (a restarted server ends our session: that is no reason to report it down)."""
        reused = self.conn is not None and not self.conn.closed and not self.conn.broken
        conn = self._connection()
        try:
            return work(conn)
        except psycopg.OperationalError:
            if not (reused and conn.broken) or self._calls.running_for() is not None:
                raise                            # abandoned by the caller: leave the connection alone
            self.drop()
            return work(self._connection())

    def _connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = None
            self.conn = self._open()
        return self.conn

    def _open(self) -> psycopg.Connection:
        password = self.cfg.password()
        kw: dict[str, Any] = dict(autocommit=True, application_name="dbguard",
                                  connect_timeout=max(1, round(self.cfg.connect_timeout)))
        if password is not None:
            kw["password"] = password
        ns = self.ns()
        if ns is not HOST:
            kw["host"] = ",".join(ns.path(h) for h in self._hosts)

        def transient(e: BaseException) -> bool:
            return isinstance(e, psycopg.OperationalError) and not any(p in str(e) for p in _PERMANENT)

        try:
            conn = retry(lambda: psycopg.connect(self.cfg.dsn, **kw), transient, attempts=3,
                         within=self.cfg.connect_timeout, wait=exponential(0.05, 0.5))
        except psycopg.Error as e:
            raise DbguardError(connect_error_line(str(e), self.where, password)) from None
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("SET statement_timeout = {}").format(
                    sql.Literal(int(self.cfg.statement_timeout * 1000))))
                # CASE, not AND: has_function_privilege() errors when the extension is absent.
                cur.execute("SELECT current_setting('is_superuser') = 'on', current_setting('block_size')::int, "
                            "CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_buffercache') "
                            "THEN has_function_privilege('pg_buffercache_pages()', 'EXECUTE') ELSE false END")
                self.superuser, self.block_size, self.has_buffercache = cur.fetchone()
                try:
                    cur.execute("SHOW data_directory")     # superuser or pg_read_all_settings
                    self.data_directory = cur.fetchone()[0]
                except psycopg.errors.InsufficientPrivilege:
                    pass
                # Read at every connect: the endpoint may lead to another cluster after a restart.
                self.system_identifier = ""
                try:
                    cur.execute("SELECT system_identifier::text FROM pg_control_system()")
                    self.system_identifier = cur.fetchone()[0]
                except psycopg.errors.InsufficientPrivilege:
                    pass
        except psycopg.Error as e:
            conn.close()
            raise DbguardError(f"{self.where}: {one_line(e)}") from None
        self.opened += 1
        return conn

    @property
    def identity(self) -> dict[str, str] | None:
        """The server this connection reached: its system_identifier (a standby shares its
        primary's, so the data directory too, when we may read it); None until known."""
        if not self.system_identifier:
            return None
        return {"system_identifier": self.system_identifier, "data_directory": self.data_directory or ""}

    def ns(self) -> Host:
        """The server's namespaces (HOST without namespace_of). Raises DbguardError when the
        container is not found (not running, or no process of it sees the socket directory)."""
        try:
            return self.namespace.get()
        except DbguardError as e:
            raise DbguardError(f"cannot connect to {self.where}: {e}") from None

    def failed(self, e: psycopg.Error) -> str:
        """One line for a failed statement; drops a broken connection so the next call reconnects."""
        if self.conn is not None and (self.conn.broken or isinstance(e, psycopg.OperationalError)):
            self.drop()
        if isinstance(e, psycopg.errors.QueryCanceled):
            return f"{self.where}: statement timed out after {self.cfg.statement_timeout}s"
        return f"{self.where}: {one_line(e)}"

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self.drop()
