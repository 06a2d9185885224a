"""PostgreSQL behind the Database interface.

What this adapter does, and why it is built this way:
- One persistent psycopg 3 connection (autocommit, application_name=dbguard, statement_timeout
  on every connection), reopened when broken. Connecting is retried with a short backoff but
  bounded by about 2 x connect_timeout: protection must never stall on SQL.
- collect() never raises. With SQL down it still reports the postmaster pid from
  postmaster.pid (the data directory is remembered from the last success, or taken from
  cfg.data_directory), but only if that pid is alive and runs in the data directory: a stale
  file left by a crash gives server_pid=None, never a pid that may have been reused.
- Roles come from pg_stat_activity.backend_type (see BACKEND_TYPE_ROLES for the split).
- Shrinking halves cfg.shrink_settings per step (never below shrink_floor nor above the
  original) with ALTER SYSTEM + pg_reload_conf(): it applies to new sessions and to existing
  ones at their next statement. The DBA's originals (value, and whether they came from
  ALTER SYSTEM) are saved in the originals file before the first change; step 0 puts them
  back exactly (ALTER SYSTEM SET x = original, or ALTER SYSTEM RESET x) and removes the file.
- Sessions are ended with pg_cancel_backend / pg_terminate_backend, and only for pids
  pg_stat_activity lists: never a signal from Python.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

import psycopg
import tenacity
from psycopg import sql

from ..config import DatabaseConfig
from ..errors import DbguardError
from ..model import DbSession, DbStats, Role
from ..originals import Originals
from ..sense.procfs import rss_anon
from .base import Database, Outcome

QUERY_MAX = 200

# backend_type -> role. PG_BACKEND: ending it (by SQL) ends only that one session's or job's
# work, and PostgreSQL or the client starts another when needed. PG_AUXILIARY: a process the
# whole server depends on; losing it means a crash restart or a stuck server. A backend_type
# not listed here (a newer PostgreSQL) counts as auxiliary: we shield what we do not know.
BACKEND_TYPE_ROLES: dict[str, Role] = {
    "client backend": Role.PG_BACKEND,
    "parallel worker": Role.PG_BACKEND,        # part of one client's query
    "autovacuum worker": Role.PG_BACKEND,      # the launcher starts another later
    "walsender": Role.PG_BACKEND,              # the replica reconnects
    "background worker": Role.PG_BACKEND,      # extension / logical apply workers: restarted by their launcher
    "checkpointer": Role.PG_AUXILIARY,
    "background writer": Role.PG_AUXILIARY,
    "walwriter": Role.PG_AUXILIARY,
    "startup": Role.PG_AUXILIARY,              # crash recovery / standby replay
    "archiver": Role.PG_AUXILIARY,
    "autovacuum launcher": Role.PG_AUXILIARY,
    "logical replication launcher": Role.PG_AUXILIARY,
    "walreceiver": Role.PG_AUXILIARY,
    "logger": Role.PG_AUXILIARY,
}

_UNIT_BYTES = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_UNIT_RE = re.compile(r"^(\d*)\s*(B|kB|MB|GB|TB)$")


# --- pure logic ------------------------------------------------------------------------------
def role_of(backend_type: str) -> Role:
    return BACKEND_TYPE_ROLES.get(backend_type, Role.PG_AUXILIARY)


def unit_bytes(unit: str | None) -> int | None:
    """Bytes per unit of a pg_settings memory unit ("kB", "8kB", "MB"); None if not memory."""
    m = _UNIT_RE.match(unit or "")
    if not m:
        return None
    return int(m.group(1) or 1) * _UNIT_BYTES[m.group(2)]


def setting_bytes(setting: str, unit: str | None) -> int | None:
    per = unit_bytes(unit)
    if per is None:
        return None
    value = int(setting)
    return value * per if value >= 0 else None      # -1: "use another setting"


def size_literal(nbytes: int) -> str:
    """A value PostgreSQL accepts for a memory setting, exact to the kB (its smallest unit)."""
    if nbytes % 1024**2 == 0:
        return f"{nbytes // 1024**2}MB"
    return f"{max(1, nbytes // 1024)}kB"


def shrunk_bytes(original: int, floor: int, step: int) -> int:
    """original / 2**step, never below the floor and never above the original."""
    if step <= 0:
        return original
    return min(original, max(floor, original >> step))


def steps_to_floor(original: int, floor: int) -> int:
    """How many halvings until `original` reaches the floor (0 if it is there already)."""
    steps = 0
    while original > floor and (original >> steps) > floor:
        steps += 1
    return steps


def shrink_steps_max(originals: dict[str, int], floor: int, configured_steps: int) -> int:
    if configured_steps <= 0 or not originals:
        return 0
    return min(configured_steps, max(steps_to_floor(b, floor) for b in originals.values()))


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


# --- /proc facts -------------------------------------------------------------------------------
def postmaster_pid(data_directory: str) -> int | None:
    """The live postmaster of `data_directory`, from postmaster.pid; None if absent or stale."""
    if not data_directory:
        return None
    try:
        with open(os.path.join(data_directory, "postmaster.pid")) as f:
            pid = int(f.readline())
    except (OSError, ValueError):
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return None                  # crashed and left the file behind
    except PermissionError:
        return pid                   # not ours to check (not root): the file is the best fact left
    return pid if os.path.realpath(cwd) == os.path.realpath(data_directory) else None


# --- the adapter -------------------------------------------------------------------------------
_COLLECT_SQL = """
SELECT
  (SELECT coalesce(json_agg(json_build_array(pid, backend_type, state, usename, left(query, %(qmax)s),
            extract(epoch FROM now() - coalesce(CASE WHEN state = 'active' THEN query_start
                                                      ELSE state_change END, backend_start)),
            pid = pg_backend_pid())), '[]'::json)
     FROM pg_stat_activity WHERE pid IS NOT NULL),
  (SELECT json_object_agg(name, json_build_array(setting, unit, sourcefile))
     FROM pg_settings WHERE name = ANY(%(names)s)),
  (SELECT sum(blks_hit)::float8 / nullif(sum(blks_hit) + sum(blks_read), 0) FROM pg_stat_database)
"""

# pg_buffercache locks and reads every buffer header: ~11 ms for 500MB of shared_buffers here,
# growing with the size. Sampled now and then, on its own, so a slow scan costs no cycle its stats.
_BUFFERCACHE_SQL = "SELECT count(*) FROM pg_buffercache WHERE relfilenode IS NOT NULL"
BUFFERCACHE_EVERY = 30.0       # seconds between two pg_buffercache scans


class PostgreSQL(Database):
    kind = "postgresql"

    def __init__(self, cfg: DatabaseConfig, state_dir: str):
        self.cfg = cfg
        self.name = cfg.name
        self.originals = Originals(state_dir, cfg.name)
        self._conn: psycopg.Connection | None = None
        self._stuck: tuple[threading.Thread, float] | None = None    # a worker the server never answered
        self._lock = threading.Lock()
        self._data_directory = cfg.data_directory
        self._has_buffercache = False
        self._used_buffers: int | None = None
        self._used_buffers_at = float("-inf")
        self._used_buffers_note = ""
        self._block_size = 8192
        self._superuser = False
        try:
            info = psycopg.conninfo.conninfo_to_dict(cfg.dsn)
        except psycopg.ProgrammingError as e:
            raise DbguardError(f"databases.{cfg.name}.dsn: not a valid libpq connection string: {e}") from None
        self._where = f"host={info.get('host', '/var/run/postgresql')} port={info.get('port', 5432)}"

    # --- connections ---------------------------------------------------------------------
    def _open(self) -> psycopg.Connection:
        password = self.cfg.password()
        kw: dict[str, Any] = dict(autocommit=True, application_name="dbguard",
                                  connect_timeout=max(1, round(self.cfg.connect_timeout)))
        if password is not None:
            kw["password"] = password
        permanent = ("password authentication failed", "does not exist", "no pg_hba.conf entry",
                     "no password supplied")

        def transient(e: BaseException) -> bool:
            return isinstance(e, psycopg.OperationalError) and not any(p in str(e) for p in permanent)

        retry = tenacity.Retrying(
            retry=tenacity.retry_if_exception(transient),
            stop=tenacity.stop_after_attempt(3) | tenacity.stop_after_delay(self.cfg.connect_timeout),
            wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
            reraise=True)
        try:
            conn = retry(psycopg.connect, self.cfg.dsn, **kw)
        except psycopg.Error as e:
            raise DbguardError(connect_error_line(str(e), self._where, password)) from None
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("SET statement_timeout = {}").format(
                    sql.Literal(int(self.cfg.statement_timeout * 1000))))
                # CASE, not AND: has_function_privilege() errors when the extension is absent.
                cur.execute("SELECT current_setting('is_superuser') = 'on', current_setting('block_size')::int, "
                            "CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_buffercache') "
                            "THEN has_function_privilege('pg_buffercache_pages()', 'EXECUTE') ELSE false END")
                self._superuser, self._block_size, self._has_buffercache = cur.fetchone()
                try:
                    cur.execute("SHOW data_directory")     # superuser or pg_read_all_settings
                    self._data_directory = cur.fetchone()[0]
                except psycopg.errors.InsufficientPrivilege:
                    pass
        except psycopg.Error as e:
            conn.close()
            raise DbguardError(f"{self._where}: {self._one_line(e)}") from None
        return conn

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = None
            self._conn = self._open()
        return self._conn

    @property
    def call_budget(self) -> float:
        """Longest one call may block: connecting (retries included) is bounded by about
        2 x connect_timeout, and a statement by statement_timeout, but only while the server
        answers at all; a stopped server or a silent network is cut off here."""
        return max(2 * self.cfg.connect_timeout, self.cfg.statement_timeout) + 0.5

    def _on_connection(self, work):
        """work(conn) in a worker thread, waited for at most call_budget seconds.

        psycopg waits for the server without a client-side limit, and statement_timeout is
        enforced by the server: neither helps when the server stops answering. The worker
        that did not come back keeps the connection it holds (it is closed when it ends); the
        next calls use a new one, and fail at once while the stuck worker is still waiting.
        """
        stuck = self._stuck
        if stuck is not None and stuck[0].is_alive():
            raise DbguardError(f"{self._where}: no answer for {time.monotonic() - stuck[1]:.0f}s to an earlier "
                               "statement; is the server stopped, hung or unreachable?")
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = self._retry_once(work)
            except BaseException as e:      # noqa: BLE001 - handed to the caller's thread
                result["error"] = e

        worker = threading.Thread(target=run, name=f"dbguard-pg-{self.name}", daemon=True)
        worker.start()
        worker.join(self.call_budget)
        if worker.is_alive():
            self._stuck = (worker, time.monotonic())
            self._conn = None                # the worker's now; never shared with it again
            raise DbguardError(f"{self._where}: no answer within {self.call_budget:.1f}s; "
                               "is the server stopped, hung or unreachable?")
        self._stuck = None
        if "error" in result:
            raise result["error"]
        return result["value"]

    def _retry_once(self, work):
        """work(conn) on the persistent connection; once more on a new one if the old one was lost
        (a restarted server ends our session: that is no reason to report it down)."""
        reused = self._conn is not None and not self._conn.closed and not self._conn.broken
        conn = self._connection()
        try:
            return work(conn)
        except psycopg.OperationalError:
            if not (reused and conn.broken) or self._stuck is not None:
                raise
            self._drop()
            return work(self._connection())

    @staticmethod
    def _one_line(e: BaseException) -> str:
        return " ".join(str(e).split()) or type(e).__name__

    def _sql_failed(self, e: psycopg.Error) -> str:
        """One line for a failed statement; drops a broken connection so the next call reconnects."""
        if self._conn is not None and (self._conn.broken or isinstance(e, psycopg.OperationalError)):
            self._drop()
        if isinstance(e, psycopg.errors.QueryCanceled):
            return f"{self._where}: statement timed out after {self.cfg.statement_timeout}s"
        return f"{self._where}: {self._one_line(e)}"

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --- state file ------------------------------------------------------------------------
    def _saved(self) -> dict[str, Any] | None:
        try:
            saved = self.originals.load()
            if saved is not None:
                int(saved["step"]), dict(saved["settings"])
            return saved
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise DbguardError(f"{self.originals.path}: unreadable state file ({type(e).__name__}); put the "
                               f"settings {', '.join(self.cfg.shrink_settings)} back by hand, then remove it") from None

    def _current_step(self) -> int:
        try:
            saved = self._saved()
        except DbguardError:
            return 0
        return int(saved["step"]) if saved else 0

    # --- collect ---------------------------------------------------------------------------
    def collect(self) -> DbStats:
        with self._lock:
            try:
                return self._on_connection(self._collect)
            except DbguardError as e:
                return self._down(str(e))
            except psycopg.Error as e:
                return self._down(self._sql_failed(e))
            except Exception as e:          # never into the main loop
                return self._down(f"{self._where}: unexpected {type(e).__name__}: {self._one_line(e)}")

    def _down(self, error: str) -> DbStats:
        pid = postmaster_pid(self._data_directory)
        return DbStats(name=self.name, kind=self.kind, up=False, error=error, server_pid=pid,
                       data_directory=self._data_directory,
                       roles={pid: Role.POSTMASTER} if pid else {},
                       shrink_step=self._current_step())

    def _collect(self, conn: psycopg.Connection) -> DbStats:
        names = ["shared_buffers", *self.cfg.shrink_settings]
        with conn.cursor() as cur:
            cur.execute(_COLLECT_SQL, {"qmax": QUERY_MAX, "names": names})
            row = cur.fetchone()
        activity, settings, hit_ratio = row[0], row[1] or {}, row[2]
        used_buffers = self._sample_buffercache(conn)

        server_pid = postmaster_pid(self._data_directory)
        roles: dict[int, Role] = {}
        sessions = []
        counts: dict[str, int] = {}
        for pid, backend_type, state, user, text, age, is_self in activity:
            backend_type = backend_type or ""
            counts[backend_type] = counts.get(backend_type, 0) + 1
            role = role_of(backend_type)
            roles[pid] = role
            if role is Role.PG_BACKEND and not is_self:
                sessions.append(DbSession(pid=pid, kind=backend_type, state=state or "", user=user or "",
                                          query=text or "", age_seconds=float(age or 0.0),
                                          memory_bytes=rss_anon(pid), client=backend_type == "client backend"))
        if server_pid:
            roles[server_pid] = Role.POSTMASTER

        sb = settings.get("shared_buffers")
        shared_buffers = setting_bytes(sb[0], sb[1]) if sb else 0
        current = {n: b for n in self.cfg.shrink_settings if n in settings
                   for b in [setting_bytes(settings[n][0], settings[n][1])] if b is not None}
        extra: dict[str, Any] = {"settings": {n: size_literal(b) for n, b in current.items()}, "backends": counts}
        try:
            saved = self._saved()
        except DbguardError as e:       # the stats are still good; say what is wrong with the file
            saved, extra["state_error"] = None, str(e)
        # Steps count from the DBA's values: the saved originals while shrunk, else the current ones.
        originals = {n: v["bytes"] for n, v in saved["settings"].items()} if saved else current
        if used_buffers is None:
            extra["cache_used"] = self._used_buffers_note
        return DbStats(
            name=self.name, kind=self.kind, up=True, server_pid=server_pid,
            data_directory=self._data_directory, roles=roles, sessions=tuple(sessions),
            cache_bytes=shared_buffers or 0, cache_configured_bytes=shared_buffers or 0,
            cache_used_bytes=(used_buffers or 0) * self._block_size,
            hit_ratio=hit_ratio, shrink_step=int(saved["step"]) if saved else 0,
            shrink_steps_max=shrink_steps_max(originals, self.cfg.shrink_floor, self.cfg.shrink_steps),
            extra=extra)

    def _sample_buffercache(self, conn: psycopg.Connection) -> int | None:
        """Buffers in use, from pg_buffercache at most every BUFFERCACHE_EVERY seconds; None if unknown."""
        if not self._has_buffercache:
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

    # --- shrinking -------------------------------------------------------------------------
    def set_shrink_step(self, step: int) -> Outcome:
        with self._lock:
            try:
                return self._on_connection(lambda conn: self._set_step(conn, max(0, step)))
            except DbguardError as e:
                return Outcome.failed(str(e))
            except psycopg.Error as e:
                return Outcome.failed(self._sql_failed(e))

    def recover(self) -> Outcome:
        if self._saved() is None:
            return Outcome.skipped("nothing to recover: no settings left changed")
        return self.set_shrink_step(0)

    def _read_originals(self, cur: psycopg.Cursor) -> dict[str, dict[str, Any]]:
        cur.execute("SELECT name, setting, unit, source, sourcefile FROM pg_settings WHERE name = ANY(%s)",
                    [list(self.cfg.shrink_settings)])
        rows = {r[0]: r for r in cur.fetchall()}
        written = self._auto_conf_text(cur)
        out = {}
        for name in self.cfg.shrink_settings:
            if name not in rows:
                raise DbguardError(f"databases.{self.name}.shrink_settings: {name} is not a PostgreSQL setting")
            _, setting, unit, source, sourcefile = rows[name]
            nbytes = setting_bytes(setting, unit)
            if nbytes is None:
                raise DbguardError(f"databases.{self.name}.shrink_settings: {name} is not a memory size setting")
            if source == "configuration file" and sourcefile is None:
                # Without the file name we cannot tell ALTER SYSTEM from postgresql.conf, so we
                # could not put the DBA's setting back exactly: refuse rather than guess.
                raise DbguardError(f"cannot tell where {name} is set (pg_settings.sourcefile hidden): connect as "
                                   f"a superuser or GRANT pg_read_all_settings TO {cur.connection.info.user}")
            out[name] = {"value": written.get(name, size_literal(nbytes)), "bytes": nbytes,
                         "auto_conf": (sourcefile or "").endswith("postgresql.auto.conf")}
        return out

    def _auto_conf_text(self, cur: psycopg.Cursor) -> dict[str, str]:
        """The values as the DBA wrote them by ALTER SYSTEM (superusers only may read pg_file_settings)."""
        if not self._superuser:
            return {}
        cur.execute("SELECT name, setting, sourcefile FROM pg_file_settings WHERE name = ANY(%s) AND error IS NULL "
                    "ORDER BY seqno", [list(self.cfg.shrink_settings)])
        return {name: setting for name, setting, sourcefile in cur.fetchall()
                if (sourcefile or "").endswith("postgresql.auto.conf")}

    def _missing_privilege(self, cur: psycopg.Cursor) -> str:
        """'' when every ALTER SYSTEM and the reload are allowed, else the one line saying what to grant."""
        if self._superuser:
            return ""
        cur.execute("SELECT array_agg(n) FILTER (WHERE NOT has_parameter_privilege(n, 'ALTER SYSTEM')), "
                    "has_function_privilege('pg_reload_conf()', 'EXECUTE') FROM unnest(%s::text[]) n",
                    [list(self.cfg.shrink_settings)])
        denied, reload_ok = cur.fetchone()
        if denied:
            grants = "; ".join(f"GRANT ALTER SYSTEM ON PARAMETER {n} TO {{user}}" for n in denied)
            return ("permission denied for ALTER SYSTEM: connect as a superuser or " + grants +
                    " (PostgreSQL 15+)")
        if not reload_ok:
            return ("permission denied for function pg_reload_conf: connect as a superuser or "
                    "GRANT EXECUTE ON FUNCTION pg_reload_conf() TO {user}")
        return ""

    def _alter(self, cur: psycopg.Cursor, name: str, value: str | None) -> None:
        if value is None:
            cur.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        else:
            cur.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))

    def _restore(self, cur: psycopg.Cursor, originals: dict[str, dict[str, Any]], names: list[str]) -> None:
        for name in names:
            o = originals[name]
            self._alter(cur, name, o["value"] if o["auto_conf"] else None)

    def _set_step(self, conn: psycopg.Connection, step: int) -> Outcome:
        saved = self._saved()
        if step == 0 and saved is None:
            return Outcome.done("settings are as configured")
        user = conn.info.user
        with conn.cursor() as cur:
            missing = self._missing_privilege(cur)
            if missing:
                return Outcome.failed(missing.replace("{user}", user))
            if step == 0:
                self._restore(cur, saved["settings"], list(saved["settings"]))
                cur.execute("SELECT pg_reload_conf()")
                self.originals.clear()
                restored = ", ".join(f"{n}={v['value']}" for n, v in saved["settings"].items())
                return Outcome.done(f"restored {restored}")
            originals = saved["settings"] if saved else self._read_originals(cur)
            top = shrink_steps_max({n: o["bytes"] for n, o in originals.items()},
                                   self.cfg.shrink_floor, self.cfg.shrink_steps)
            if top == 0:
                return Outcome.failed(f"nothing to shrink: {', '.join(originals)} already at or below "
                                      f"shrink_floor, or shrink_steps = 0")
            step = min(step, top)
            # The originals are on disk before the first change: a crash from here on is undone by recover().
            self.originals.save({"step": saved["step"] if saved else 0, "settings": originals,
                                 "saved_at": saved["saved_at"] if saved else time.time()})
            done: list[str] = []
            targets = {n: size_literal(shrunk_bytes(o["bytes"], self.cfg.shrink_floor, step))
                       for n, o in originals.items()}
            try:
                for name, value in targets.items():
                    self._alter(cur, name, value)
                    done.append(name)
                cur.execute("SELECT pg_reload_conf()")
            except psycopg.Error:
                # All or nothing: put back what this step changed (best effort on a broken link).
                try:
                    previous = saved["step"] if saved else 0
                    if previous == 0:
                        self._restore(cur, originals, done)
                    for name in done if previous else ():
                        self._alter(cur, name, size_literal(
                            shrunk_bytes(originals[name]["bytes"], self.cfg.shrink_floor, previous)))
                    cur.execute("SELECT pg_reload_conf()")
                    if saved is None:
                        self.originals.clear()
                except psycopg.Error:
                    pass
                raise
            self.originals.save({"step": step, "settings": originals,
                                 "saved_at": saved["saved_at"] if saved else time.time()})
            return Outcome.done(f"step {step}: " + ", ".join(f"{n}={v}" for n, v in targets.items()))

    # --- sessions --------------------------------------------------------------------------
    def cancel(self, pid: int) -> Outcome:
        return self._signal_backend(pid, "pg_cancel_backend", "cancelled the running statement of")

    def terminate(self, pid: int) -> Outcome:
        return self._signal_backend(pid, "pg_terminate_backend", "terminated")

    def _signal_backend(self, pid: int, function: str, done: str) -> Outcome:
        with self._lock:
            try:
                return self._on_connection(lambda conn: self._signal_on(conn, pid, function, done))
            except DbguardError as e:
                return Outcome.failed(str(e))
            except psycopg.errors.InsufficientPrivilege:
                return Outcome.failed(f"permission denied for {function}({pid}): GRANT pg_signal_backend TO "
                                      f"{self._conn.info.user if self._conn else 'dbguard'} (cannot end superuser "
                                      "sessions without being superuser)")
            except psycopg.Error as e:
                return Outcome.failed(self._sql_failed(e))

    def _signal_on(self, conn: psycopg.Connection, pid: int, function: str, done: str) -> Outcome:
        with conn.cursor() as cur:
            # Only a session of this server, and never our own.
            cur.execute("SELECT backend_type, pid = pg_backend_pid() FROM pg_stat_activity WHERE pid = %s", [pid])
            row = cur.fetchone()
            if row is None:
                return Outcome.failed(f"pid {pid} is not a backend of {self._where}")
            backend_type, is_self = row
            if is_self or role_of(backend_type or "") is not Role.PG_BACKEND:
                return Outcome.failed(f"pid {pid} is a {backend_type or 'server process'}, not a session; left alone")
            cur.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(function)), [pid])
            ok = cur.fetchone()[0]
        if not ok:
            return Outcome.failed(f"{function}({pid}) returned false: the session is gone")
        return Outcome.done(f"{done} {backend_type} {pid}")
