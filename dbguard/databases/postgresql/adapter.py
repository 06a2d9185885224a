"""PostgreSQL behind the Database interface: the modules of this package, composed.

collect() never raises, and never waits long: the postmaster is found by fact, without SQL
(identity.py: the data directory's postmaster.pid, else the socket lock file or the listening
socket), so a refused login, a LOGIN-only role or a hung backend still leave it shielded, and a
collect that does not answer within COLLECT_BUDGET is reported down for this cycle.
"""
from __future__ import annotations

import time
from typing import Callable

from ...settings import DatabaseConfig
from ...errors import DbguardError
from ...model import DbStats, Outcome
from ...originals import Originals
from ...sense.procfs import rss_anon
from ...sense.tempfiles import pg_temp_bytes
from ..base import Database
from ..identity import Found, Tracker
from . import sessions
from .connection import Connection, one_line
from .driver import psycopg     # without Python's ssl module
from .identity import identify
from .settings import Settings
from .stats import COLLECT_SQL, QUERY_MAX, Reading, down_stats, to_stats

# pg_buffercache locks and reads every buffer header: ~11 ms for 500MB of shared_buffers here,
# growing with the size. Sampled now and then, on its own, so a slow scan costs no cycle its stats.
_BUFFERCACHE_SQL = "SELECT count(*) FROM pg_buffercache WHERE relfilenode IS NOT NULL"
BUFFERCACHE_EVERY = 30.0       # seconds between two pg_buffercache scans
# The longest the loop waits for one collect (a healthy one takes milliseconds): a backend that
# stopped answering (SIGSTOP, a lock, a dying disk) costs a cycle this much, once; the call goes
# on in its worker and later cycles do not wait for it (databases/bounded.py).
COLLECT_BUDGET = 0.5


_STATE_SCHEMA = {"step": int, "saved_at": float,
                 "settings": {str: {"value": str, "bytes?": int, "number?": float, "auto_conf": bool, "set?": str,
                                    "was?": str}}}


def _host_pids(activity: list[list], pid_map: dict[int, int] | None) -> list[list]:
    """pg_stat_activity rows with the container's pids replaced by the host's (rows of a
    process that has exited since are left out); unchanged when the server shares our pids."""
    if pid_map is None:
        return activity
    return [[pid_map[row[0]], *row[1:]] for row in activity if row[0] in pid_map]


class PostgreSQL(Database):
    kind = "postgresql"

    def __init__(self, cfg: DatabaseConfig, state_dir: str):
        self.cfg = cfg
        self.name = cfg.name
        self.link = Connection(cfg)
        self.originals = Originals(state_dir, cfg.name, _STATE_SCHEMA, fix=(
            f"check {', '.join(cfg.shrink_settings)} (ALTER SYSTEM) are as the DBA set them"),
            server=lambda: self.link.identity)
        self.settings = Settings(cfg, self.originals)
        self._used_buffers: int | None = None
        self._used_buffers_at = float("-inf")
        self._used_buffers_note = ""
        self.identity = Tracker(self._identify)
        self._looked_at_open = 0

    def _attempt(self, work: Callable[[psycopg.Connection], Outcome],
                 denied: Callable[[], str] | None = None) -> Outcome:
        """work(conn), bounded; every error becomes a failed Outcome of one line."""
        try:
            return self.link.run(work)
        except DbguardError as e:
            return Outcome.failed(str(e))
        except psycopg.errors.InsufficientPrivilege as e:
            return Outcome.failed(denied() if denied else self.link.failed(e))
        except psycopg.Error as e:
            return Outcome.failed(self.link.failed(e))

    # --- collect -------------------------------------------------------------------------------
    def found(self) -> Found:
        """The postmaster by fact (kept while it lives; SQL is not needed)."""
        return self.identity.get()

    def collect(self) -> DbStats:
        try:
            return self.link.run(self._collect, budget=COLLECT_BUDGET)
        except DbguardError as e:
            return self._down(str(e))
        except psycopg.Error as e:
            return self._down(self.link.failed(e))
        except Exception as e:          # never into the main loop
            return self._down(f"{self.link.where}: unexpected {type(e).__name__}: {one_line(e)}")

    def _identify(self) -> Found:
        try:
            ns = self.link.ns()
        except DbguardError as e:
            return Found(None, why_not=str(e))
        return identify(self.cfg, self.link.data_directory, ns)

    def _down(self, error: str) -> DbStats:
        f = self.found()
        return down_stats(self.name, error, f.pid, f.data_directory or self.link.data_directory,
                          self.settings.current_step(), identity=f.how or f.why_not)

    def _collect(self, conn: psycopg.Connection) -> DbStats:
        with conn.cursor() as cur:
            cur.execute(COLLECT_SQL, {"qmax": QUERY_MAX, "names": ["shared_buffers", *self.cfg.shrink_settings]})
            activity, settings, hit_ratio = cur.fetchone()
        activity = _host_pids(activity, self.link.ns().pid_map())
        reading = Reading(activity=activity, settings=settings or {}, hit_ratio=hit_ratio,
                          used_buffers=self._sample_buffercache(conn), block_size=self.link.block_size)
        notes: dict[str, str] = {}
        try:
            saved = self.settings.saved()
        except DbguardError as e:       # the stats are still good; say what is wrong with the file
            saved, notes["state_error"] = None, str(e)
        if reading.used_buffers is None:
            notes["cache_used"] = self._used_buffers_note
        f = self.found()
        moved = f.ok and self.link.data_directory and f.data_directory != self.link.data_directory
        if moved or (not f.ok and self.link.opened != self._looked_at_open):
            # SQL names another data directory, or a new connection (a restarted server) may
            # find what the last look did not: look again now, not after Tracker's pause.
            self._looked_at_open = self.link.opened
            self.identity.forget()
            f = self.found()
        return to_stats(self.name, reading, server_pid=f.pid, identity=f.how or f.why_not,
                        data_directory=f.data_directory or self.link.data_directory,
                        shrink_settings=self.cfg.shrink_settings, saved=saved, floor=self.cfg.shrink_floor,
                        steps=self.cfg.shrink_steps, memory_of=rss_anon, notes=notes,
                        temp_of=pg_temp_bytes)

    def _sample_buffercache(self, conn: psycopg.Connection) -> int | None:
        """Buffers in use, from pg_buffercache at most every BUFFERCACHE_EVERY seconds; None if unknown."""
        if not self.link.has_buffercache:
            self._used_buffers_note = ("pg_buffercache not installed (or no EXECUTE on it): "
                                       "CREATE EXTENSION pg_buffercache to see it")
            return None
        now = time.monotonic()
        if now - self._used_buffers_at >= BUFFERCACHE_EVERY:
            self._used_buffers_at = now
            try:
                with conn.cursor() as cur:
                    cur.execute(_BUFFERCACHE_SQL)
                    self._used_buffers = cur.fetchone()[0]
            except psycopg.errors.QueryCanceled:
                self._used_buffers = None
                self._used_buffers_note = "pg_buffercache scan took over statement_timeout"
        return self._used_buffers

    # --- shrinking -----------------------------------------------------------------------------
    def set_shrink_step(self, step: int) -> Outcome:
        return self._attempt(lambda conn: self.settings.set_step(conn, max(0, step), self.link.superuser))

    def server_key(self) -> dict[str, str] | None:
        return self.link.identity

    def recover(self) -> Outcome:
        """work_mem and friends need no refill: everything a previous run left shrunk goes back at once."""
        try:
            if self.settings.saved() is None:
                return Outcome.skipped("nothing to recover: no settings left changed")
        except DbguardError as e:
            return Outcome.failed(str(e))
        return self.set_shrink_step(0)

    # --- sessions ------------------------------------------------------------------------------
    def cancel(self, pid: int) -> Outcome:
        return self._end(pid, sessions.CANCEL)

    def terminate(self, pid: int) -> Outcome:
        return self._end(pid, sessions.TERMINATE)

    def _end(self, pid: int, how: tuple[str, str]) -> Outcome:
        """`pid` is the host's; a server in a container knows its backends by their pids there."""
        def work(conn: psycopg.Connection) -> Outcome:
            own = self.link.ns().ns_pid(pid)
            if own is None:
                return Outcome.gone(f"pid {pid} is not in the namespace of {self.link.where}")
            return sessions.end(conn, own, how, self.link.where, host_pid=pid)
        return self._attempt(work,
                             denied=lambda: sessions.permission_denied(how[0], pid, self.link.user))

    def close(self) -> None:
        self.link.close()
