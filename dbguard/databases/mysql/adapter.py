"""MySQL 8.x and MariaDB 10.6+ behind the Database interface: the modules of this package, composed.

Nothing here raises into the loop: collect() reports a server it cannot read as down, and
every act returns an Outcome whose detail says what failed and how to fix it.
"""
from __future__ import annotations

from typing import Any, Callable

import pymysql

from ...settings import DatabaseConfig
from ...errors import ConfigError, DbguardError
from ...model import DbStats, Outcome, Role
from ...originals import Originals
from ...sense.procfs import rss_anon
from ...sense.tempfiles import open_file_bytes, tmpdirs, under
from ..base import Database
from . import sessions
from .buffer_pool import CACHE_MINIMUMS, SESSION_CAPS, BufferPool, mib
from .connection import ER_NO_SUCH_THREAD, Link, status, variables
from ..identity import Found, Tracker
from .identity import identify, server_pid, server_rss
from .stats import Reading, to_stats


# innodb_buffer_pool_size: the DBA's size (missing once someone else set the pool while shrunk);
# server: the version; set / was: what dbguard last set (buffer_pool.py); identity: originals.py.
_STATE_SCHEMA = {"innodb_buffer_pool_size?": int, "caches?": {str: int}, "server?": str, "saved_at?": float,
                 "set?": {str: int}, "was?": {str: int}}


class MySQL(Database):
    kind = "mysql"

    def __init__(self, cfg: DatabaseConfig, state_dir: str):
        unknown = [c for c in cfg.shrink_caches if c not in CACHE_MINIMUMS]
        if unknown:
            raise ConfigError(f"databases.{cfg.name}.shrink_caches: {unknown[0]!r} is not supported; "
                              f"choose from {', '.join(CACHE_MINIMUMS)}")
        self.cfg = cfg
        self.name = cfg.name
        self.originals = Originals(state_dir, cfg.name, _STATE_SCHEMA, fix=(
            "check innodb_buffer_pool_size is the configured size (SET GLOBAL)"), server=lambda: self.link.identity)
        self.link = Link(cfg)
        self.pool = BufferPool(cfg, self.originals, self.link)
        self.identity = Tracker(self._identify)

    def _identify(self) -> Found:
        try:
            ns = self.link.ns()
        except DbguardError as e:
            return Found(None, why_not=str(e))
        return identify(self.cfg, ns)

    def _attempt(self, work: Callable[[Any], Outcome], doing: str) -> Outcome:
        try:
            return self.link.run(work)
        except Exception as e:
            return Outcome.failed(self.link.explain(e, doing))

    # --- collect -------------------------------------------------------------------------------
    def collect(self) -> DbStats:
        try:
            return self.link.run(self._collect)
        except Exception as e:   # never into the loop: stale stats, protection goes on
            self.link.drop()
            found = self.identity.get()      # the server by fact: no login needed to shield it
            return DbStats(name=self.name, kind=self.kind, up=False, error=self.link.explain(e, "read statistics"),
                           server_pid=found.pid, identity=found.how or found.why_not,
                           data_directory=found.data_directory,
                           roles={found.pid: Role.MYSQLD} if found.pid else {})

    def _collect(self, conn) -> DbStats:
        facts = self.link.facts
        v = variables(conn, ("pid_file", "datadir", "basedir", "innodb_buffer_pool_size", "performance_schema",
                             "tmpdir", *self.cfg.shrink_caches, *SESSION_CAPS))
        server_status = status(conn, "Innodb_buffer_pool%")
        own = sessions.own_id(conn)
        pool = self.pool.look(int(v["innodb_buffer_pool_size"]), server_status, v)
        pid, pid_error = server_pid(v["pid_file"], v["datadir"], v["basedir"], facts.peer_pid, self.link.ns())
        how = f"@@pid_file {v['pid_file']}, checked against @@datadir{self.link.ns().where()}"
        if pid is None:                  # SQL could not confirm it: the listening socket still can
            found = self.identity.get()
            pid, how = found.pid, found.how or found.why_not
        perf_schema = str(v.get("performance_schema", "OFF")).upper() in ("ON", "1")
        by_connection = sessions.memory_by_connection(conn) if perf_schema else {}
        # mysqld's open temporary files in tmpdir: the kernel does not say whose they are.
        temp = open_file_bytes(pid, under(tmpdirs(v.get("tmpdir", "")))) if pid else 0
        reading = Reading(variables=v, status=server_status, processlist=sessions.processlist(conn, facts.mariadb),
                          own_id=own, memory_by_connection=by_connection,
                          memory_global_total=sessions.memory_global_total(conn) if perf_schema else None,
                          temp_bytes=temp)
        notes: dict[str, Any] = {}
        if pid_error:
            notes["server_pid_error"] = pid_error
        try:
            self.pool.saved()
        except DbguardError as e:
            notes["state_error"] = str(e)
        if self.pool.last_resize is not None:
            notes["last_resize"] = self.pool.last_resize.summary()
        return to_stats(self.name, reading, facts, pool, server_pid=pid, identity=how, server_rss=server_rss(pid),
                        shrink_caches=(*self.cfg.shrink_caches, *self.pool.caps(v)), notes=notes, server_anon=rss_anon(pid) if pid else None)

    # --- shrink / grow -------------------------------------------------------------------------
    def set_shrink_step(self, step: int) -> Outcome:
        return self._attempt(lambda conn: self.pool.set_step(conn, step), "resize the buffer pool")

    def server_key(self) -> dict[str, str] | None:
        return self.link.identity

    def recover(self) -> Outcome:
        """At start: say what a previous run left shrunk; the daemon grows it back one step at a
        time (a buffer pool refills gradually). A server restarted meanwhile runs at its my.cnf
        size again: the originals file just goes."""
        try:
            if self.pool.saved() is None:
                return Outcome.skipped("nothing to recover: no settings left changed")
        except DbguardError as e:
            return Outcome.failed(str(e))
        s = self.collect()
        if not s.up:
            return Outcome.failed(s.error)
        if s.shrink_step == 0:
            return self.set_shrink_step(0)
        return Outcome.done(f"a previous run left the buffer pool at step {s.shrink_step} of {s.shrink_steps_max} "
                            f"({mib(s.cache_bytes)} of the DBA's {mib(s.cache_configured_bytes)}); "
                            "it grows back one step at a time")

    # --- sessions ------------------------------------------------------------------------------
    def cancel(self, pid: int) -> Outcome:
        return self._kill(sessions.QUERY, pid)

    def terminate(self, pid: int) -> Outcome:
        return self._kill(sessions.CONNECTION, pid)

    def _kill(self, what: str, conn_id: int) -> Outcome:
        """`pid` is a connection id (DbSession.kind == "connection"): KILL by id, never a signal."""
        try:
            return self.link.run(lambda conn: sessions.kill(conn, what, conn_id, self.name))
        except pymysql.err.MySQLError as e:
            if e.args and e.args[0] == ER_NO_SUCH_THREAD:
                return Outcome.gone(f"mysql {self.name}: connection {conn_id} is gone")
            return Outcome.failed(self.link.explain(e, "kill other users' statements"))
        except Exception as e:
            return Outcome.failed(self.link.explain(e, "kill other users' statements"))

    def close(self) -> None:
        self.link.drop()
        self.pool.close()
