"""MySQL 8.x and MariaDB 10.6+ behind the Database interface.

What this adapter does, and why it is built this way:
- Identity by fact: the server pid comes from `@@pid_file` and is accepted only if that
  process runs with `@@datadir` as its working directory, is owned by the owner of the
  data directory, runs an executable under `@@basedir`, and (over a unix socket) is the
  peer of our own connection. A process merely called mysqld gets no role.
- Shrinking: `SET GLOBAL innodb_buffer_pool_size` (never SET PERSIST: the DBA's my.cnf
  stays the truth after a restart). Two resize flavours exist: MariaDB >= 10.11.12 (it has
  `innodb_buffer_pool_size_max`) resizes synchronously in the calling session in 1 MiB
  units and can be aborted; MySQL and older MariaDB round to chunk_size x instances and
  resize in a server background thread. Either way the SET runs on its own connection in
  a worker thread, so the main loop waits at most `statement_timeout` for it.
- Growing back happens one step per call (gradual), shrinking may jump several steps.
- The DBA's size is saved in the originals file before the first change and the file is
  removed only once the configured size is back, so a killed dbguard restores it at start.
- Sessions are ended with KILL QUERY / KILL CONNECTION by connection id. DbSession.pid is
  that connection id (DbSession.kind == "connection"), never an OS pid.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import struct
import threading
import time
from typing import Any

import pymysql
import tenacity

from ..config import DatabaseConfig
from ..errors import ConfigError, DbguardError
from ..model import DbSession, DbStats, Role
from ..originals import Originals
from ..sense.procfs import read_proc
from .base import Database, Outcome

MiB = 1024**2
RESIZE_TIMEOUT = 120.0          # seconds a single buffer pool resize may take before it is aborted
AUTO_SHRINK_HOLDOFF = 60.0      # no growing back for this long after MariaDB shrank the pool itself

# Runtime caches dbguard may scale down with `shrink_caches`, with the lowest value it uses.
CACHE_MINIMUMS: dict[str, int] = {
    "table_open_cache": 64,
    "table_definition_cache": 400,
    "thread_cache_size": 0,
    "key_buffer_size": 8 * MiB,
    "query_cache_size": 0,
}

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


# --- pure logic ------------------------------------------------------------------------------
def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit if unit > 1 else value


def step_target(configured: int, floor: int, steps: int, step: int, unit: int) -> int:
    """Buffer pool size for `step`: 0 is the DBA's size, `steps` the floor, linear between.

    Rounded up to the server's resize unit so the server never rounds it below the floor.
    """
    if step <= 0 or not shrink_steps_max(configured, floor, steps, unit):
        return configured
    step = min(step, steps)
    raw = configured - (configured - floor) * step / steps
    return min(configured, max(round_up(math.ceil(raw), unit), round_up(floor, unit)))


def shrink_steps_max(configured: int, floor: int, steps: int, unit: int = 1) -> int:
    """0 when there is nothing to shrink: the floor, in the server's units, is not below the pool."""
    return steps if steps > 0 and configured > round_up(floor, unit) else 0


def step_of(current: int, configured: int, floor: int, steps: int, unit: int) -> int:
    """Which step a pool of `current` bytes is at: the deepest step whose target it does not exceed."""
    top = shrink_steps_max(configured, floor, steps, unit)
    for s in range(top, 0, -1):
        if current <= step_target(configured, floor, steps, s, unit):
            return s
    return 0


def cache_target(original: int, minimum: int, steps: int, step: int) -> int:
    """Runtime caches are halved at each step, never below their minimum."""
    if step <= 0 or steps <= 0 or original <= minimum:
        return original
    return max(minimum, original >> min(step, steps))


@dataclasses.dataclass(frozen=True)
class Grants:
    """Global privileges of the connected user, as SHOW GRANTS lists them."""

    privileges: frozenset[str]

    @classmethod
    def parse(cls, lines: list[str]) -> "Grants":
        privs: set[str] = set()
        for line in lines:
            if " ON *.* TO " not in line.upper():
                continue
            body = line[len("GRANT "):line.upper().index(" ON *.* TO ")]
            privs.update(p.strip().upper() for p in body.split(","))
        return cls(frozenset(privs))

    def has(self, *any_of: str) -> bool:
        return "ALL PRIVILEGES" in self.privileges or any(p in self.privileges for p in any_of)


def needed_grants(mariadb: bool) -> dict[str, tuple[str, ...]]:
    """What dbguard does -> the privileges any one of which allows it."""
    if mariadb:
        return {"resize the buffer pool": ("SUPER",),
                "kill other users' statements": ("CONNECTION ADMIN", "SUPER"),
                "see all sessions": ("PROCESS",)}
    return {"resize the buffer pool": ("SYSTEM_VARIABLES_ADMIN", "SUPER"),
            "kill other users' statements": ("CONNECTION_ADMIN", "SUPER"),
            "see all sessions": ("PROCESS",)}


def missing_grants(grants: Grants, mariadb: bool) -> list[str]:
    return [f"{what}: {' or '.join(privs)}" for what, privs in needed_grants(mariadb).items()
            if not grants.has(*privs)]


# --- /proc facts about the server process ------------------------------------------------------
def _proc_rss(pid: int) -> int | None:
    proc = read_proc(pid)
    return proc.rss_bytes if proc else None


def verify_server_pid(pid: int, datadir: str, basedir: str, peer_pid: int | None) -> str:
    """'' when `pid` is the server these facts describe, else why not (one line)."""
    if peer_pid is not None and peer_pid != pid:
        return f"pid file says {pid} but the socket peer is {peer_pid}"
    proc = read_proc(pid)
    if proc is None:
        return f"process {pid} from the pid file does not exist"
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        data_uid = os.stat(datadir).st_uid
    except OSError as e:
        return f"cannot check process {pid}: {e.strerror} (dbguard must run on the server's host, as root)"
    if os.path.normpath(cwd) != os.path.normpath(datadir):
        return f"process {pid} does not run in the data directory {datadir}"
    if proc.uid != data_uid:
        return f"process {pid} is not owned by the owner of {datadir}"
    if basedir and not proc.exe.startswith(os.path.normpath(basedir).rstrip("/") + "/"):
        return f"process {pid} runs {proc.exe or '(unreadable)'}, not a server under {basedir}"
    return ""


def _peer_pid(conn: pymysql.connections.Connection) -> int | None:
    sock = getattr(conn, "_sock", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None


# --- the adapter -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Server:
    """Facts read once per connection: they change only when the server restarts."""

    mariadb: bool
    version: str
    session_resize: bool       # MariaDB >= 10.11.12: synchronous, 1 MiB units, abortable
    unit: int                  # resize granularity in bytes
    page_size: int
    auto_min: int | None       # MariaDB innodb_buffer_pool_size_auto_min
    grants: Grants
    peer_pid: int | None


@dataclasses.dataclass
class _Resize:
    target: int
    started: float
    rss_before: int | None
    conn_id: int | None = None
    done: bool = False
    error: str = ""
    size_after: int | None = None
    rss_after: int | None = None
    finished: float | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "conn_id"}


class MySQL(Database):
    kind = "mysql"

    def __init__(self, cfg: DatabaseConfig, state_dir: str):
        unknown = [c for c in cfg.shrink_caches if c not in CACHE_MINIMUMS]
        if unknown:
            raise ConfigError(f"databases.{cfg.name}.shrink_caches: {unknown[0]!r} is not supported; "
                              f"choose from {', '.join(CACHE_MINIMUMS)}")
        self.cfg = cfg
        self.name = cfg.name
        self.originals = Originals(state_dir, cfg.name)
        self._conn: pymysql.connections.Connection | None = None
        self._server: _Server | None = None
        self._lock = threading.Lock()          # the main connection is used from the loop only
        self._resize: _Resize | None = None
        self._worker: threading.Thread | None = None
        self._baseline: int | None = None      # largest pool seen without our change: the DBA's size
        self._last_size: int | None = None     # pool size after our last look or resize
        self._auto_shrunk_at: float | None = None
        self.auto_shrink_holdoff = AUTO_SHRINK_HOLDOFF

    # --- connections ---------------------------------------------------------------------
    @property
    def _where(self) -> str:
        return self.cfg.socket or f"{self.cfg.host}:{self.cfg.port}"

    def _connect_kwargs(self, read_timeout: float) -> dict[str, Any]:
        kw: dict[str, Any] = dict(user=self.cfg.user or None, password=self.cfg.password() or "",
                                  connect_timeout=self.cfg.connect_timeout, read_timeout=read_timeout,
                                  write_timeout=self.cfg.statement_timeout + 1, autocommit=True,
                                  charset="utf8mb4")
        if self.cfg.socket:
            kw["unix_socket"] = self.cfg.socket
        else:
            kw.update(host=self.cfg.host, port=self.cfg.port)
        return kw

    def _open(self, read_timeout: float) -> pymysql.connections.Connection:
        """A new connection; connect errors retried, bounded by about 2 x connect_timeout."""
        retry = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(2) | tenacity.stop_after_delay(self.cfg.connect_timeout),
            wait=tenacity.wait_fixed(0.2),
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, pymysql.err.OperationalError) and e.args and e.args[0] in CONNECTION_LOST),
            reraise=True)
        return retry(pymysql.connect, **self._connect_kwargs(read_timeout))

    def _with_conn(self, fn):
        """fn(connection); a connection the server dropped (restart) is replaced once."""
        reused = self._conn is not None and self._conn.open
        try:
            return fn(self._main())
        except pymysql.err.OperationalError as e:
            if not (e.args and e.args[0] in CONNECTION_LOST):
                raise
            self._drop()
            if not reused or "timed out" in str(e):
                raise         # a server that does not answer gets no second wait
            return fn(self._main())

    def _main(self) -> pymysql.connections.Connection:
        if self._conn is not None and self._conn.open:
            return self._conn
        self._drop()
        conn = self._open(self.cfg.statement_timeout + 1)
        try:
            self._server = self._inspect(conn)
            self._bound_statements(conn, self.cfg.statement_timeout)
        except Exception:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _bound_statements(self, conn, seconds: float) -> None:
        cur = conn.cursor()
        if self._server.mariadb:
            cur.execute("SET SESSION max_statement_time = %s", (seconds,))
        else:
            cur.execute("SET SESSION max_execution_time = %s", (int(seconds * 1000),))   # SELECTs only

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    def close(self) -> None:
        self._drop()
        w = self._worker
        if w is not None and w.is_alive():
            w.join(self.cfg.statement_timeout)

    def _inspect(self, conn) -> _Server:
        variables = _variables(conn, ("version", "innodb_buffer_pool_chunk_size", "innodb_buffer_pool_instances",
                                      "innodb_buffer_pool_size_max", "innodb_buffer_pool_size_auto_min",
                                      "innodb_page_size"))
        version = variables["version"]
        mariadb = "mariadb" in version.lower()
        session_resize = mariadb and "innodb_buffer_pool_size_max" in variables
        if session_resize:
            unit = MiB
        else:
            unit = int(variables.get("innodb_buffer_pool_chunk_size") or MiB) * int(
                variables.get("innodb_buffer_pool_instances") or 1)
        auto_min = variables.get("innodb_buffer_pool_size_auto_min")
        cur = conn.cursor()
        cur.execute("SHOW GRANTS FOR CURRENT_USER()")
        grants = Grants.parse([r[0] for r in cur.fetchall()])
        return _Server(mariadb=mariadb, version=version, session_resize=session_resize, unit=unit,
                       page_size=int(variables.get("innodb_page_size") or 16384),
                       auto_min=int(auto_min) if auto_min is not None else None,
                       grants=grants, peer_pid=_peer_pid(conn))

    def _explain(self, e: Exception, doing: str) -> str:
        """One line for the user: what failed and how to fix it."""
        if isinstance(e, DbguardError):
            return str(e)
        code = e.args[0] if isinstance(e, pymysql.err.MySQLError) and e.args else None
        msg = (e.args[1] if isinstance(e, pymysql.err.MySQLError) and len(e.args) > 1 else str(e)).splitlines()[0]
        user = self.cfg.user or "dbguard"
        mariadb = self._server.mariadb if self._server else True
        if code == ER_ACCESS_DENIED:
            return (f"mysql {self.name}: login refused for user {user!r}: {msg}; check user and "
                    f"password_file/password_env in [[databases]] {self.name}")
        if code in CONNECTION_LOST:
            return (f"mysql {self.name}: cannot reach the server at {self._where}: {msg}; is it running? "
                    f"check host/port/socket in [[databases]] {self.name}")
        if code in (ER_SPECIFIC_ACCESS_DENIED, ER_KILL_DENIED, ER_DBACCESS_DENIED, ER_TABLEACCESS_DENIED):
            privs = needed_grants(mariadb).get(doing)
            if privs:
                grant = privs[0]
                return (f"mysql {self.name}: dbguard needs {' or '.join(privs)} to {doing}: "
                        f"GRANT {grant} ON *.* TO '{user}'@'<host>' ({msg})")
        if code in (ER_STATEMENT_TIMEOUT, ER_QUERY_TIMEOUT, ER_QUERY_INTERRUPTED):
            return f"mysql {self.name}: {doing} took longer than statement_timeout ({msg})"
        return f"mysql {self.name}: cannot {doing}: {msg}"

    # --- collect -------------------------------------------------------------------------
    def collect(self) -> DbStats:
        with self._lock:
            try:
                return self._with_conn(self._collect)
            except Exception as e:   # never into the loop: stale stats, protection goes on
                self._drop()
                return DbStats(name=self.name, kind=self.kind, up=False,
                               error=self._explain(e, "read statistics"))

    def _collect(self, conn) -> DbStats:
        srv = self._server
        v = _variables(conn, ("pid_file", "datadir", "basedir", "innodb_buffer_pool_size",
                              "performance_schema", *self.cfg.shrink_caches))
        status = _status(conn, "Innodb_buffer_pool%")
        cur = conn.cursor()
        cur.execute("SELECT CONNECTION_ID()")
        own_id = cur.fetchone()[0]

        size = self._observe(int(v["innodb_buffer_pool_size"]))
        configured = self._configured(size)
        steps_max = shrink_steps_max(configured, self.cfg.buffer_pool_floor, self.cfg.shrink_steps, srv.unit)
        step = step_of(size, configured, self.cfg.buffer_pool_floor, self.cfg.shrink_steps, srv.unit)

        pid, pid_error = self._server_pid(v["pid_file"], v["datadir"], v["basedir"])
        rss = _proc_rss(pid) if pid else None
        perf_schema = str(v.get("performance_schema", "OFF")).upper() in ("ON", "1")
        by_thread = self._memory_by_connection(conn) if perf_schema else {}
        sessions = self._sessions(conn, own_id, by_thread)

        reads = int(status.get("Innodb_buffer_pool_reads", 0))
        requests = int(status.get("Innodb_buffer_pool_read_requests", 0))
        pages_data = int(status.get("Innodb_buffer_pool_pages_data", 0))
        extra: dict[str, Any] = {
            "version": srv.version,
            "resize_mode": "session (1 MiB)" if srv.session_resize else f"background (unit {srv.unit} bytes)",
            "resize_unit_bytes": srv.unit,
            "resize_status": status.get("Innodb_buffer_pool_resize_status", ""),
            "resize_in_progress": self._resize_running(status),
            "pages_total": int(status.get("Innodb_buffer_pool_pages_total", 0)),
            "pages_free": int(status.get("Innodb_buffer_pool_pages_free", 0)),
            "pages_data": pages_data,
            "pages_dirty": int(status.get("Innodb_buffer_pool_pages_dirty", 0)),
            "read_requests": requests,
            "reads": reads,
            "server_rss_bytes": rss,
            "buffer_pool_floor": self.cfg.buffer_pool_floor,
            "auto_shrink_min": self._auto_shrink_min(configured),
            "auto_shrunk_seconds_ago": self._auto_shrink_recent(),
            "missing_grants": missing_grants(srv.grants, srv.mariadb),
            "caches": {c: int(v[c]) for c in self.cfg.shrink_caches if c in v},
        }
        if perf_schema:
            extra["memory_global_total"] = self._memory_global_total(conn)
        if pid_error:
            extra["server_pid_error"] = pid_error
        try:
            self._saved()
        except DbguardError as e:
            extra["state_error"] = str(e)
        if self._resize is not None:
            extra["last_resize"] = self._resize.summary()
        return DbStats(
            name=self.name, kind=self.kind, up=True,
            server_pid=pid, data_directory=v["datadir"],
            roles={pid: Role.MYSQLD} if pid else {},
            sessions=tuple(sessions),
            cache_bytes=size, cache_configured_bytes=configured,
            cache_used_bytes=pages_data * srv.page_size,
            hit_ratio=(1 - reads / requests) if requests else None,
            shrink_step=step, shrink_steps_max=steps_max, extra=extra,
            grow_bytes=max(0, step_target(configured, self.cfg.buffer_pool_floor, self.cfg.shrink_steps,
                                          step - 1, srv.unit) - size) if step else 0)

    def _observe(self, size: int) -> int:
        """Notice MariaDB shrinking the pool by itself (innodb_buffer_pool_size_auto_min)."""
        ours = self._resize is not None and size == self._resize.target   # our worker may not have noted it yet
        if (self._last_size is not None and size < self._last_size and not ours
                and self._auto_shrink_min(size + 1) is not None):
            self._auto_shrunk_at = time.monotonic()
        self._last_size = size
        return size

    def _auto_shrink_recent(self) -> float | None:
        """Seconds since MariaDB last shrank the pool itself, while within the hold-off."""
        if self._auto_shrunk_at is None:
            return None
        ago = time.monotonic() - self._auto_shrunk_at
        return ago if ago < self.auto_shrink_holdoff else None

    def _saved(self) -> dict[str, Any] | None:
        """The originals file, checked; a damaged one is one line telling the DBA what to do."""
        try:
            saved = self.originals.load()
            if saved is not None:
                int(saved["innodb_buffer_pool_size"]), dict(saved.get("caches", {}))
            return saved
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise DbguardError(
                f"{self.originals.path}: unreadable state file ({type(e).__name__}); set innodb_buffer_pool_size "
                "back to the configured size by hand (SET GLOBAL), then remove the file") from None

    def _configured(self, size: int) -> int:
        """The DBA's size: saved originals while dbguard has it changed, else the largest seen."""
        try:
            saved = self._saved()
        except DbguardError:
            saved = None      # collect() reports it; set_shrink_step() refuses to act on it
        if saved and "innodb_buffer_pool_size" in saved:
            return int(saved["innodb_buffer_pool_size"])
        if self._baseline is None or size > self._baseline or self._auto_shrink_min(size) is None:
            # Only MariaDB's own pressure shrinking lowers the pool behind our back; without it
            # a smaller value is the DBA's new choice.
            self._baseline = size
        return self._baseline

    def _auto_shrink_min(self, configured: int) -> int | None:
        """MariaDB's own memory-pressure shrinking floor, when it is on for this pool."""
        a = self._server.auto_min if self._server else None
        return a if a is not None and a < configured else None

    def _server_pid(self, pid_file: str, datadir: str, basedir: str) -> tuple[int | None, str]:
        try:
            with open(pid_file) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as e:
            return None, f"cannot read pid file {pid_file}: {getattr(e, 'strerror', None) or e}"
        why = verify_server_pid(pid, datadir, basedir, self._server.peer_pid)
        return (None, why) if why else (pid, "")

    def _sessions(self, conn, own_id: int, by_thread: dict[int, int]) -> list[DbSession]:
        cur = conn.cursor()
        mem_col = ", MEMORY_USED" if self._server.mariadb else ""
        time_col = "TIME_MS / 1000" if self._server.mariadb else "TIME"
        cur.execute(f"SELECT ID, USER, COMMAND, {time_col}, STATE, INFO{mem_col} "
                    "FROM information_schema.PROCESSLIST")
        out = []
        for row in cur.fetchall():
            cid, user, command, age, state, info = row[:6]
            if cid == own_id or command in ("Daemon", "Binlog Dump", "Killed") or user in (
                    "system user", "event_scheduler"):
                continue
            mem = by_thread.get(cid, int(row[6]) if len(row) > 6 and row[6] is not None else 0)
            out.append(DbSession(pid=int(cid), kind="connection",
                                 state="idle" if command == "Sleep" else "active" if command == "Query"
                                 else str(command).lower(),
                                 user=user or "", query=(info or "")[:200],
                                 age_seconds=float(age or 0), memory_bytes=int(mem)))
        return out

    def _memory_by_connection(self, conn) -> dict[int, int]:
        try:
            cur = conn.cursor()
            cur.execute("SELECT t.PROCESSLIST_ID, SUM(m.CURRENT_NUMBER_OF_BYTES_USED) "
                        "FROM performance_schema.threads t "
                        "JOIN performance_schema.memory_summary_by_thread_by_event_name m USING (THREAD_ID) "
                        "WHERE t.PROCESSLIST_ID IS NOT NULL GROUP BY t.PROCESSLIST_ID")
            return {int(a): int(b) for a, b in cur.fetchall() if b is not None}
        except pymysql.err.MySQLError:
            return {}   # no SELECT on performance_schema: fall back to what PROCESSLIST says

    def _memory_global_total(self, conn) -> int | None:
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

    def _resize_running(self, status: dict[str, str]) -> bool:
        if self._worker is not None and self._worker.is_alive():
            return True
        code = status.get("Innodb_buffer_pool_resize_status_code")   # MySQL >= 8.0.31
        if code is not None:
            return code not in ("0", "")
        text = status.get("Innodb_buffer_pool_resize_status", "").lower()
        return bool(text) and not any(w in text for w in ("completed", "did not change", "not changed", "failed"))

    # --- shrink / grow -------------------------------------------------------------------
    def set_shrink_step(self, step: int) -> Outcome:
        with self._lock:
            try:
                return self._with_conn(lambda c: self._set_step(c, step))
            except Exception as e:
                return Outcome.failed(self._explain(e, "resize the buffer pool"))

    def _set_step(self, conn, step: int) -> Outcome:
        srv = self._server
        v = _variables(conn, ("innodb_buffer_pool_size", *self.cfg.shrink_caches))
        size = self._observe(int(v["innodb_buffer_pool_size"]))
        configured = self._configured(size)
        floor, steps = self.cfg.buffer_pool_floor, self.cfg.shrink_steps
        top = shrink_steps_max(configured, floor, steps, srv.unit)
        step = max(0, min(step, top))
        now_step = step_of(size, configured, floor, steps, srv.unit)
        if self._resize_running(_status(conn, "Innodb_buffer_pool_resize%")):
            r = self._resize
            since = f" for {time.monotonic() - r.started:.1f}s" if r else ""
            return Outcome.failed(f"mysql {self.name}: a buffer pool resize is in progress{since}; "
                                  "trying again next cycle")
        if step < now_step - 1:
            step = now_step - 1       # grow back one step per call, so the server refills gradually
        target = step_target(configured, floor, steps, step, srv.unit)
        saved = self._saved()
        if (step > 0 or size < configured) and saved is None:
            # Before the first change, and as soon as the pool is found smaller than the DBA's size.
            self.originals.save({"innodb_buffer_pool_size": configured,
                                 "caches": {c: int(v[c]) for c in self.cfg.shrink_caches},
                                 "server": srv.version, "saved_at": time.time()})
            saved = self.originals.load()
        ago = self._auto_shrink_recent()
        if target > size and step < now_step and ago is not None:
            return Outcome.done(f"MariaDB shrank the buffer pool itself {ago:.0f}s ago "
                                 f"(innodb_buffer_pool_size_auto_min); not growing it back before "
                                 f"{self.auto_shrink_holdoff:.0f}s without that")
        notes = self._set_caches(conn, saved, step, top)
        if step >= now_step and target > size:
            # Smaller than this step already (MariaDB's own pressure shrinking): growing happens
            # only when a lower step is asked for.
            detail = (f"buffer pool already {_mib(size)} <= step {step} ({_mib(target)}); left as is")
            return Outcome.done(self._finish(step, size, configured, detail, notes))
        if target == size:
            return Outcome.done(self._finish(step, size, configured,
                                              f"buffer pool at {_mib(size)} (step {step}/{top})", notes))
        return self._resize_to(target, size, step, top, configured, notes)

    def _set_caches(self, conn, saved: dict | None, step: int, top: int) -> list[str]:
        notes = []
        originals = (saved or {}).get("caches", {})
        cur = conn.cursor()
        for c in self.cfg.shrink_caches:
            if c not in originals:
                continue
            want = cache_target(int(originals[c]), CACHE_MINIMUMS[c], top, step)
            cur.execute(f"SET GLOBAL {c} = %s", (want,))
            notes.append(f"{c}={want}")
        return notes

    def _finish(self, step: int, size: int, configured: int, detail: str, notes: list[str]) -> str:
        if step == 0 and size >= configured:
            self.originals.clear()   # the DBA's settings are back: nothing left to restore
        return detail + (f"; {', '.join(notes)}" if notes else "")

    def _resize_to(self, target: int, size: int, step: int, top: int, configured: int,
                   notes: list[str]) -> Outcome:
        pid = self._current_pid()
        r = _Resize(target=target, started=time.monotonic(), rss_before=_proc_rss(pid) if pid else None)
        self._resize = r
        self._worker = threading.Thread(target=self._resize_worker, args=(r, pid),
                                        name=f"dbguard-resize-{self.name}", daemon=True)
        self._worker.start()
        # Wait a bounded while: a MariaDB resize of a few hundred MiB takes tens of milliseconds.
        self._worker.join(self.cfg.statement_timeout)
        verb = "shrink" if target < size else "grow"
        head = f"buffer pool {verb} {_mib(size)} -> {_mib(target)} (step {step}/{top})"
        if not r.done:
            return Outcome.done(self._note(f"{head} still running after {self.cfg.statement_timeout}s", notes))
        if r.error:
            return Outcome.failed(r.error)
        return self._verify(r, head, step, configured, notes)

    def _verify(self, r: _Resize, head: str, step: int, configured: int, notes: list[str]) -> Outcome:
        """The variable must have moved, and on a shrink the server's memory must have fallen."""
        if r.size_after is None or abs(r.size_after - r.target) >= self._server.unit:   # beyond server rounding
            return Outcome.failed(f"mysql {self.name}: {head}: server reports {_mib(r.size_after or 0)}")
        rss = ""
        if r.rss_before is not None and r.rss_after is not None:
            fell = r.rss_after < r.rss_before
            rss = f"; server RSS {_mib(r.rss_before)} -> {_mib(r.rss_after)}"
            if r.target < r.rss_before and not fell and "shrink" in head:
                rss += " (did not fall: the freed pages were not resident)"
        detail = self._finish(step, r.size_after, configured, head + rss, notes)
        return Outcome.done(detail)

    @staticmethod
    def _note(head: str, notes: list[str]) -> str:
        return head + (f"; {', '.join(notes)}" if notes else "")

    def _current_pid(self) -> int | None:
        try:
            v = _variables(self._conn, ("pid_file", "datadir", "basedir"))
            pid, _ = self._server_pid(v["pid_file"], v["datadir"], v["basedir"])
            return pid
        except Exception:
            return None

    def _resize_worker(self, r: _Resize, pid: int | None) -> None:
        """Runs the SET on its own connection: MariaDB resizes inside that statement."""
        conn = None
        try:
            conn = self._open(RESIZE_TIMEOUT + 5)
            cur = conn.cursor()
            cur.execute("SELECT CONNECTION_ID()")
            r.conn_id = cur.fetchone()[0]
            if self._server.mariadb:
                cur.execute("SET SESSION max_statement_time = %s", (RESIZE_TIMEOUT,))
            cur.execute("SET GLOBAL innodb_buffer_pool_size = %s", (r.target,))
            if not self._server.session_resize:
                self._wait_background_resize(cur, r.started + RESIZE_TIMEOUT)
            cur.execute("SELECT @@GLOBAL.innodb_buffer_pool_size")
            r.size_after = int(cur.fetchone()[0])
            self._last_size = r.size_after
            r.rss_after = _proc_rss(pid) if pid else None
        except Exception as e:
            r.error = self._explain(e, "resize the buffer pool")
        finally:
            r.finished = time.monotonic()
            r.done = True
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

    def _wait_background_resize(self, cur, deadline: float) -> None:
        """MySQL / older MariaDB resize in a server thread: poll its status until it is done."""
        while time.monotonic() < deadline:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_resize%'")
            status = {k: v for k, v in cur.fetchall()}
            code = status.get("Innodb_buffer_pool_resize_status_code")
            text = status.get("Innodb_buffer_pool_resize_status", "").lower()
            if code is not None and code == "0" or code is None and (
                    not text or any(w in text for w in ("completed", "did not change", "failed"))):
                return
            time.sleep(0.1)

    # --- sessions ------------------------------------------------------------------------
    def cancel(self, pid: int) -> Outcome:
        return self._kill("QUERY", pid)

    def terminate(self, pid: int) -> Outcome:
        return self._kill("CONNECTION", pid)

    def _kill(self, what: str, conn_id: int) -> Outcome:
        """`pid` is a connection id (DbSession.kind == "connection"): KILL by id, never a signal."""
        def kill(conn) -> Outcome:
            cur = conn.cursor()
            cur.execute("SELECT CONNECTION_ID()")
            if cur.fetchone()[0] == conn_id:
                return Outcome.failed(f"mysql {self.name}: refusing to kill dbguard's own connection")
            cur.execute(f"KILL {what} %s", (int(conn_id),))
            return Outcome.done(f"KILL {what} {conn_id}")

        with self._lock:
            try:
                return self._with_conn(kill)
            except pymysql.err.MySQLError as e:
                if e.args and e.args[0] == ER_NO_SUCH_THREAD:
                    return Outcome.failed(f"mysql {self.name}: connection {conn_id} is gone")
                return Outcome.failed(self._explain(e, "kill other users' statements"))
            except Exception as e:
                return Outcome.failed(self._explain(e, "kill other users' statements"))

    def recover(self) -> Outcome:
        """At start: if a previous run left the pool shrunk, take the first step back up.

        Later steps follow from the policy at level ok (collect() reports shrink_step > 0).
        """
        try:
            if self._saved() is None:
                return Outcome.skipped("nothing to restore")
        except DbguardError as e:
            return Outcome.failed(str(e))
        return self.set_shrink_step(0)


# --- small SQL helpers ---------------------------------------------------------------------------
def _variables(conn, names: tuple[str, ...]) -> dict[str, str]:
    cur = conn.cursor()
    marks = ", ".join(["%s"] * len(names))
    cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({marks})", names)
    return {k.lower(): v for k, v in cur.fetchall()}


def _status(conn, like: str) -> dict[str, str]:
    cur = conn.cursor()
    cur.execute("SHOW GLOBAL STATUS LIKE %s", (like,))
    return {k: v for k, v in cur.fetchall()}


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"
