"""Ending PostgreSQL sessions by SQL: pg_cancel_backend / pg_terminate_backend, never a signal.

Only a pid pg_stat_activity lists as a session (a PG_BACKEND, see stats.BACKEND_TYPE_ROLES)
of this very server, and never dbguard's own connection.
"""
from __future__ import annotations

from ...model import Outcome, Role
from .. import identity
from .driver import psycopg, sql     # without Python's ssl module
from .stats import role_of

CANCEL = ("pg_cancel_backend", "cancelled the running statement of")
TERMINATE = ("pg_terminate_backend", "terminated")


def end(conn: psycopg.Connection, pid: int, how: tuple[str, str], where: str, host_pid: int | None = None) -> Outcome:
    """`pid` as the server knows it; `host_pid`: the same process's pid on the host when the
    server runs in a container (namespaces.py), for the messages and the liveness check."""
    function, done = how
    host = pid if host_pid is None else host_pid
    label = str(pid) if host == pid else f"{pid} (host pid {host})"
    with conn.cursor() as cur:
        cur.execute("SELECT backend_type, pid = pg_backend_pid() FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cur.fetchone()
        if row is None:
            # Not listed: a session that ended since it was seen is gone; a live process is no session.
            why = f"pid {label} is not a backend of {where}"
            return Outcome.refused(why) if _alive(host) else Outcome.gone(why)
        backend_type, is_self = row
        if is_self or role_of(backend_type or "") is not Role.PG_BACKEND:
            return Outcome.refused(f"pid {label} is a {backend_type or 'server process'}, not a session; left alone")
        cur.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(function)), [pid])
        ok = cur.fetchone()[0]
    if not ok:
        return Outcome.gone(f"{function}({pid}) returned false: the session is gone")
    return Outcome.done(f"{done} {backend_type} {label}")


def _alive(pid: int) -> bool:
    """A running process (not gone, not a zombie awaiting its parent)."""
    try:
        return identity.inspect(pid) is not None
    except identity.Unreadable:
        return True


def permission_denied(function: str, pid: int, user: str) -> str:
    return (f"permission denied for {function}({pid}): GRANT pg_signal_backend TO {user} (cannot end superuser "
            "sessions without being superuser)")
