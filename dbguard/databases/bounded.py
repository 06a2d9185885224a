"""Calls into a database driver that may never come back, bounded from the caller's side.

Drivers wait for the server without a client-side limit (psycopg), or a server-side resize
may run for minutes (MariaDB's SET GLOBAL innodb_buffer_pool_size): neither may stall the
main loop. The call runs in a worker thread that is waited for at most a budget. A worker
that outlives its budget is remembered: while it runs, the next call fails at once instead
of piling up a second stuck thread on the same server.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

from ..errors import DbguardError

T = TypeVar("T")


def close_quietly(conn: Any) -> None:
    """Close a driver connection being given up: it is already broken or no longer wanted,
    so whatever the close raises changes nothing."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:
        pass


class Busy(DbguardError):
    """An earlier call outlived its budget and is still running."""


class Overdue(DbguardError):
    """This call outlived its budget; it goes on in its worker thread."""


class BoundedCaller:
    """One call at a time in a worker thread, each waited for at most its budget."""

    def __init__(self, thread_name: str):
        self.thread_name = thread_name
        self._pending: tuple[threading.Thread, float] | None = None   # the worker that did not come back

    def running_for(self) -> float | None:
        """Seconds an earlier call that outlived its budget has been running; None when none is."""
        pending = self._pending
        if pending is None or not pending[0].is_alive():
            return None
        return time.monotonic() - pending[1]

    def call(self, fn: Callable[[], T], budget: float) -> T:
        """fn() in a worker thread: its value, or its exception raised here.

        Raises Busy while an earlier call is still running, Overdue when this one is not back
        within `budget` seconds (it is then remembered and left to finish on its own).
        """
        ago = self.running_for()
        if ago is not None:
            raise Busy(f"an earlier call has been running for {ago:.0f}s")
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = fn()
            except BaseException as e:      # noqa: BLE001 - handed to the caller's thread
                result["error"] = e

        worker = threading.Thread(target=run, name=self.thread_name, daemon=True)
        started = time.monotonic()
        worker.start()
        worker.join(budget)
        if worker.is_alive():
            self._pending = (worker, started)
            raise Overdue(f"no answer within {budget:.1f}s")
        self._pending = None
        if "error" in result:
            raise result["error"]
        return result["value"]

    def wait(self, timeout: float) -> None:
        """Give a call still running up to `timeout` seconds to finish (at close)."""
        pending = self._pending
        if pending is not None and pending[0].is_alive():
            pending[0].join(timeout)
