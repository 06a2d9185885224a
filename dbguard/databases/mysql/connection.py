"""The one way dbguard talks to MySQL / MariaDB: connect, bound every statement, explain errors.

One main connection for the loop (autocommit; read/write timeouts on the socket and the
server's own statement limit, max_statement_time / max_execution_time), replaced once when
the server dropped it (a restart). Facts that change only with a restart are read when it
opens (ServerFacts). Every error becomes one line saying what failed and how to fix it.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import pymysql

from ...settings import DatabaseConfig
from ...errors import DbguardError
from ..bounded import close_quietly
from ..retry import retry
from .facts import FACT_VARIABLES, ServerFacts, server_facts
from .grants import needed_grants
from ..namespaces import Host, Locator
from .identity import peer_pid
from .serverid import server_identity

T = TypeVar("T")

# MySQL error codes dbguard turns into a sentence.
ER_SPECIFIC_ACCESS_DENIED = 1227
ER_KILL_DENIED = 1095
ER_NO_SUCH_THREAD = 1094
ER_ACCESS_DENIED = 1045
ER_DBACCESS_DENIED = 1044
ER_TABLEACCESS_DENIED = 1142
ER_QUERY_INTERRUPTED = 1317
ER_STATEMENT_TIMEOUT = 1969          # MariaDB max_statement_time
ER_QUERY_TIMEOUT = 3024              # MySQL max_execution_time
CONNECTION_LOST = {2002, 2003, 2006, 2013, 2055}


def variables(conn, names: tuple[str, ...]) -> dict[str, str]:
    cur = conn.cursor()
    marks = ", ".join(["%s"] * len(names))
    cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({marks})", names)
    return {k.lower(): v for k, v in cur.fetchall()}


def status(conn, like: str) -> dict[str, str]:
    cur = conn.cursor()
    cur.execute("SHOW GLOBAL STATUS LIKE %s", (like,))
    return {k: v for k, v in cur.fetchall()}


class Link:
    """The main connection and the facts read when it opened."""

    def __init__(self, cfg: DatabaseConfig):
        self.cfg = cfg
        self.conn: pymysql.connections.Connection | None = None
        self.facts: ServerFacts | None = None
        self.identity: dict[str, str] | None = None    # serverid.py, read at every connect
        self.lock = threading.Lock()          # the main connection is used from the loop only
        # A server in a container: its socket as the container sees it, reached through the
        # container's root (validate.py requires socket with namespace_of).
        self.namespace = Locator(cfg.namespace_of, cfg.socket)

    @property
    def where(self) -> str:
        return (self.cfg.socket or f"{self.cfg.host}:{self.cfg.port}") + (
            f" (namespace_of {self.cfg.namespace_of})" if self.cfg.namespace_of else "")

    def ns(self) -> Host:
        """The server's namespaces (HOST without namespace_of); DbguardError when not found."""
        try:
            return self.namespace.get()
        except DbguardError as e:
            raise DbguardError(f"mysql {self.cfg.name}: cannot reach the server at {self.where}: {e}") from None

    def open(self, read_timeout: float) -> pymysql.connections.Connection:
        """A new connection; connect errors retried, bounded by about 2 x connect_timeout."""
        kw: dict[str, Any] = dict(user=self.cfg.user or None, password=self.cfg.password() or "",
                                  connect_timeout=self.cfg.connect_timeout, read_timeout=read_timeout,
                                  write_timeout=self.cfg.statement_timeout + 1, autocommit=True, charset="utf8mb4")
        if self.cfg.socket:
            kw["unix_socket"] = self.ns().path(self.cfg.socket)
        else:
            kw.update(host=self.cfg.host, port=self.cfg.port)
        return retry(lambda: pymysql.connect(**kw),
                     lambda e: isinstance(e, pymysql.err.OperationalError) and bool(e.args) and e.args[0] in CONNECTION_LOST,
                     attempts=2, within=self.cfg.connect_timeout, wait=lambda _: 0.2)

    def run(self, fn: Callable[[Any], T]) -> T:
        """fn(connection) under the lock; a connection the server dropped (restart) is replaced once."""
        with self.lock:
            reused = self.conn is not None and self.conn.open
            try:
                return fn(self._main())
            except pymysql.err.OperationalError as e:
                if not (e.args and e.args[0] in CONNECTION_LOST):
                    raise
                self.drop()
                if not reused or "timed out" in str(e):
                    raise         # a server that does not answer gets no second wait
                return fn(self._main())

    def _main(self) -> pymysql.connections.Connection:
        if self.conn is not None and self.conn.open:
            return self.conn
        self.drop()
        conn = self.open(self.cfg.statement_timeout + 1)
        try:
            v = variables(conn, FACT_VARIABLES)
            cur = conn.cursor()
            cur.execute("SHOW GRANTS FOR CURRENT_USER()")
            self.facts = server_facts(v, [r[0] for r in cur.fetchall()], peer_pid(conn))
            # At every connect: after a restart the endpoint may lead to another server.
            self.identity = server_identity(conn, self.facts.mariadb)
            limit_statements(conn, self.facts.mariadb, self.cfg.statement_timeout)
        except Exception:
            conn.close()
            raise
        self.conn = conn
        return conn

    def drop(self) -> None:
        close_quietly(self.conn)
        self.conn = None

    def explain(self, e: Exception, doing: str) -> str:
        """One line for the user: what failed and how to fix it."""
        if isinstance(e, DbguardError):
            return str(e)
        name = self.cfg.name
        code = e.args[0] if isinstance(e, pymysql.err.MySQLError) and e.args else None
        msg = (e.args[1] if isinstance(e, pymysql.err.MySQLError) and len(e.args) > 1 else str(e)).splitlines()[0]
        user = self.cfg.user or "dbguard"
        mariadb = self.facts.mariadb if self.facts else True
        if code == ER_ACCESS_DENIED:
            return (f"mysql {name}: login refused for user {user!r}: {msg}; check user and "
                    f"password_file/password_env in [[databases]] {name}")
        if code in CONNECTION_LOST:
            return (f"mysql {name}: cannot reach the server at {self.where}: {msg}; is it running? "
                    f"check host/port/socket in [[databases]] {name}")
        if code in (ER_SPECIFIC_ACCESS_DENIED, ER_KILL_DENIED, ER_DBACCESS_DENIED, ER_TABLEACCESS_DENIED):
            privs = needed_grants(mariadb).get(doing)
            if privs:
                return (f"mysql {name}: dbguard needs {' or '.join(privs)} to {doing}: "
                        f"GRANT {privs[0]} ON *.* TO '{user}'@'<host>' ({msg})")
        if code in (ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT, ER_QUERY_INTERRUPTED):
            return f"mysql {name}: {doing} took longer than statement_timeout ({msg})"
        return f"mysql {name}: cannot {doing}: {msg}"


def limit_statements(conn, mariadb: bool, seconds: float) -> None:
    """The server's own limit on every statement of this session."""
    cur = conn.cursor()
    if mariadb:
        cur.execute("SET SESSION max_statement_time = %s", (seconds,))
    else:
        cur.execute("SET SESSION max_execution_time = %s", (int(seconds * 1000),))   # SELECTs only
