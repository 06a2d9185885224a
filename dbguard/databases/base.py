"""The one interface the rest of dbguard uses to talk to a database.

Every method is safe to call when the server is down: `collect()` then returns
`DbStats(up=False, error=...)`, and the act methods return an `Outcome` with ok=False:
gone (the session ended), refused (not a session: a server process, our own connection),
failed (an error, in one line).
Nothing here raises into the main loop; protection must go on without SQL.
"""
from __future__ import annotations

import abc

from ..model import DbStats, Outcome

__all__ = ["Database", "Outcome"]


class Database(abc.ABC):
    kind: str
    name: str

    @abc.abstractmethod
    def collect(self) -> DbStats:
        """Read roles, sessions, cache figures. Bounded by statement/connect timeouts."""

    @abc.abstractmethod
    def set_shrink_step(self, step: int) -> Outcome:
        """Move the caches to exactly `step` (0 = the DBA's configured values, shrink_steps_max = floor).

        Records the DBA's originals durably (state file) before the first change, so they
        survive a dbguard crash; step 0 restores them exactly. How fast to move is the
        policy's choice: the adapter reports the facts it needs (DbStats.resize_in_progress,
        DbStats.self_shrunk_ago, DbStats.grow_bytes).
        """

    @abc.abstractmethod
    def cancel(self, pid: int) -> Outcome:
        """Cancel the running statement of a session (pg_cancel_backend / KILL QUERY)."""

    @abc.abstractmethod
    def terminate(self, pid: int) -> Outcome:
        """End the session (pg_terminate_backend / KILL CONNECTION). Never a signal."""

    def server_key(self) -> dict[str, str] | None:
        """What the DBA's originals are keyed by (originals.py): the facts that tell this server
        from any other (PostgreSQL system_identifier + data directory, MariaDB's Aria UUID +
        datadir, MySQL's server_uuid + datadir), learnt over SQL; None while not known."""
        return None

    def recover(self) -> Outcome:
        """At startup: deal with what a previous run left shrunk (it was killed half-way).

        skipped: nothing was left changed. Otherwise the adapter puts back what needs no
        refill at once; what is still shrunk afterwards (collect().shrink_step > 0) the caller
        steps back one step at a time, as at stop.
        """
        return self.set_shrink_step(0)

    def close(self) -> None:
        """Drop connections."""
