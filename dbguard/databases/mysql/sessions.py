"""MySQL / MariaDB sessions: read them (PROCESSLIST, performance_schema) and end them by SQL.

Sessions are threads of mysqld, named by connection id: DbSession.pid is that id
(DbSession.kind == "connection"), never an OS pid. They are ended with KILL QUERY /
KILL CONNECTION, never a signal.
"""
from __future__ import annotations

import pymysql

from ...model import Outcome
from .stats import processlist_sql

QUERY = "QUERY"
CONNECTION = "CONNECTION"


def processlist(conn, mariadb: bool) -> list[list]:
    cur = conn.cursor()
    cur.execute(processlist_sql(mariadb))
    return [list(r) for r in cur.fetchall()]


def memory_by_connection(conn) -> dict[int, int]:
    """Bytes each connection holds, from performance_schema; {} without SELECT on it."""
    try:
        cur = conn.cursor()
        cur.execute("SELECT t.PROCESSLIST_ID, SUM(m.CURRENT_NUMBER_OF_BYTES_USED) "
                    "FROM performance_schema.threads t "
                    "JOIN performance_schema.memory_summary_by_thread_by_event_name m USING (THREAD_ID) "
                    "WHERE t.PROCESSLIST_ID IS NOT NULL GROUP BY t.PROCESSLIST_ID")
        return {int(a): int(b) for a, b in cur.fetchall() if b is not None}
    except pymysql.err.MySQLError:
        return {}   # fall back to what PROCESSLIST says


def memory_global_total(conn) -> int | None:
    cur = conn.cursor()
    for q in ("SELECT total_allocated FROM sys.x$memory_global_total",
              "SELECT SUM(CURRENT_NUMBER_OF_BYTES_USED) FROM performance_schema.memory_summary_global_by_event_name"):
        try:
            cur.execute(q)
            row = cur.fetchone()
            if row and row[0] is not None:
                return int(row[0])
        except pymysql.err.MySQLError:
            continue
    return None


def own_id(conn) -> int:
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    return int(cur.fetchone()[0])


def kill(conn, what: str, conn_id: int, name: str) -> Outcome:
    """KILL QUERY / KILL CONNECTION `conn_id`; never dbguard's own connection."""
    if own_id(conn) == conn_id:
        return Outcome.refused(f"mysql {name}: refusing to kill dbguard's own connection")
    conn.cursor().execute(f"KILL {what} %s", (int(conn_id),))
    return Outcome.done(f"KILL {what} {conn_id}")
