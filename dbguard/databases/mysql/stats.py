"""MySQL / MariaDB rows -> DbStats. Pure: no connection, no /proc; unit-tested from recorded
rows (tests/fixtures/databases/mysql-*.json, captured from a real server by
tests/fixtures/databases/capture.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...model import DbSession, DbStats, Role
from ..steps import linear_step_of, linear_steps_to_floor, linear_target, shrink_steps_max
from .facts import ServerFacts
from .grants import missing_grants

QUERY_MAX = 200
# Server threads and replication streams are no client's session: never cancelled or ended.
NOT_SESSIONS_COMMANDS = ("Daemon", "Binlog Dump", "Killed")
NOT_SESSIONS_USERS = ("system user", "event_scheduler")
# Innodb_buffer_pool_resize_status words that say no resize is running (MySQL 8, MariaDB).
_RESIZE_OVER = ("completed", "did not change", "not changed", "failed")
# Innodb_buffer_pool_resize_status_code (MySQL >= 8.0.31, buf0types.h): 0 complete or none
# running, 1-6 the stages of a running resize, 7 failed.
_RESIZE_CODES_OVER = ("", "0", "7")


def processlist_sql(mariadb: bool) -> str:
    time_col = "TIME_MS / 1000" if mariadb else "TIME"
    # MariaDB: per-session memory without performance_schema, and when the statement started by
    # the server's clock (TIME_MS is to the millisecond; MySQL's TIME only to the second: none there).
    mem_col = ", MEMORY_USED, UNIX_TIMESTAMP(NOW(6)) - TIME_MS / 1000" if mariadb else ""
    return f"SELECT ID, USER, COMMAND, {time_col}, STATE, INFO{mem_col} FROM information_schema.PROCESSLIST"


def resize_running(status: dict[str, str]) -> bool:
    """Whether the server is resizing its buffer pool, from SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_resize%'.

    MySQL >= 8.0.31 has a status code; older MySQL and MariaDB only the text.
    """
    code = status.get("Innodb_buffer_pool_resize_status_code")
    if code is not None:
        return code not in _RESIZE_CODES_OVER
    text = status.get("Innodb_buffer_pool_resize_status", "").lower()
    return bool(text) and not any(w in text for w in _RESIZE_OVER)


# Seconds a statement has run before it may hold temporary files: a sort writes its first merge
# run only once its buffer is full.
SPILL_AGE = 1.0


def sessions_from(rows: list[list[Any]], own_id: int, memory_by_connection: dict[int, int],
                  temp_bytes: int = 0) -> list[DbSession]:
    """PROCESSLIST rows (ID, USER, COMMAND, TIME, STATE, INFO[, MEMORY_USED, STARTED]) -> client sessions.

    `temp_bytes`: the temporary files mysqld holds open in tmpdir. The kernel shows them as
    the server's, not a thread's, and the server does not say whose they are: they are divided
    among the statements that have run for SPILL_AGE or longer, in proportion to how long each
    has run (a sort writes its merge runs as it goes and keeps them while it merges). Killed
    statements still unwinding hold theirs until they are done: they take their share, and are
    no session. Not by state: measured (MariaDB 10.11, a dozen filesorts), a sort merging its
    runs shows other states than a sort's, and handing all the files to the one statement that
    had just begun its sort (or to two short reads) made its cancel look enough, again and again."""
    out = []
    holders = {r[0]: float(r[3] or 0) for r in rows
               if r[2] in ("Query", "Killed") and r[0] != own_id and float(r[3] or 0) >= SPILL_AGE}
    total_age = sum(holders.values())
    for row in rows:
        cid, user, command, age, state, info = row[:6]
        if cid == own_id or command in NOT_SESSIONS_COMMANDS or user in NOT_SESSIONS_USERS:
            continue
        mem = memory_by_connection.get(int(cid), int(row[6]) if len(row) > 6 and row[6] is not None else 0)
        # performance_schema's bytes used are allocated minus freed as one thread counted them,
        # and can be negative (recorded: the event scheduler at -16): it holds nothing then.
        out.append(DbSession(pid=int(cid), kind="connection",
                             state="idle" if command == "Sleep" else "active" if command == "Query"
                             else str(command).lower(),
                             user=user or "", query=(info or "")[:QUERY_MAX],
                             age_seconds=float(age or 0), memory_bytes=max(0, int(mem)),
                             temp_bytes=int(temp_bytes * holders[cid] / total_age) if cid in holders else 0,
                             started=float(row[7]) if len(row) > 7 and row[7] is not None else None))
    return out


@dataclass(frozen=True)
class Reading:
    """What one collect read, as the server returned it."""

    variables: dict[str, str]              # pid_file, datadir, basedir, innodb_buffer_pool_size, caches...
    status: dict[str, str]                 # SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool%'
    processlist: list[list[Any]]
    own_id: int
    memory_by_connection: dict[int, int] = field(default_factory=dict)   # performance_schema, when on
    memory_global_total: int | None = None
    temp_bytes: int = 0                    # mysqld's open temporary files in tmpdir (/proc/PID/fd)

    @property
    def performance_schema(self) -> bool:
        return str(self.variables.get("performance_schema", "OFF")).upper() in ("ON", "1")


@dataclass(frozen=True)
class Pool:
    """The buffer pool as dbguard sees it: the facts the adapter keeps across cycles."""

    size: int                              # innodb_buffer_pool_size now
    configured: int                        # the DBA's size (originals file while shrunk, else largest seen)
    floor: int
    steps: int
    resize_in_progress: bool = False       # the server's resize, or our resize worker still running
    self_shrunk_ago: float | None = None   # seconds since MariaDB shrank it by itself
    auto_shrink_min: int | None = None     # MariaDB's own shrinking floor, when on for this pool
    cap_steps: int = 0                     # 1 when a session memory cap can be set (buffer_pool.SESSION_CAPS)
    cap_step: int = 0                      # 1 while dbguard's cap is in effect


def pool_steps(pool: Pool, unit: int) -> tuple[int, int, int]:
    """(step now, deepest step, bytes the next grow step adds). A session memory cap is a step
    of its own: with the pool already at its floor, capping new sessions is still an answer."""
    top = max(shrink_steps_max(pool.steps, linear_steps_to_floor(pool.configured, pool.floor, pool.steps, unit)),
              pool.cap_steps)
    step = max(linear_step_of(pool.size, pool.configured, pool.floor, pool.steps, unit), pool.cap_step)
    grow = max(0, linear_target(pool.configured, pool.floor, pool.steps, step - 1, unit) - pool.size) if step else 0
    return step, top, grow


def pending_bytes(sessions: list[DbSession], server_anon: int | None) -> int:
    """What the running statements have allocated and not yet touched, at least.

    The server counts a session's memory when it is allocated (MEMORY_USED, performance_schema):
    a filesort asks for its whole sort_buffer_size before it reads a row, and the pages come
    as it fills them. Whatever of it is resident is inside the server's anonymous RSS, so the
    sessions' sum less that RSS is a lower bound of what is still to be charged (weak when the
    server's other memory, its buffer pool above all, is large next to it). 0 without the RSS.
    """
    if server_anon is None:
        return 0
    allocated = sum(s.memory_bytes for s in sessions if s.client and s.state == "active")
    return max(0, allocated - server_anon)


def to_stats(name: str, r: Reading, facts: ServerFacts, pool: Pool, *, server_pid: int | None, identity: str = "",
             server_rss: int | None, shrink_caches: tuple[str, ...], notes: dict[str, Any],
             server_anon: int | None = None) -> DbStats:
    """DbStats from one reading; `notes`: one-line remarks and the last resize for `extra`;
    `server_anon`: the server's anonymous RSS (what its sessions' memory is resident in)."""
    s = r.status
    sessions = sessions_from(r.processlist, r.own_id, r.memory_by_connection, r.temp_bytes)
    step, top, grow = pool_steps(pool, facts.unit)
    reads = int(s.get("Innodb_buffer_pool_reads", 0))
    requests = int(s.get("Innodb_buffer_pool_read_requests", 0))
    pages_data = int(s.get("Innodb_buffer_pool_pages_data", 0))
    extra: dict[str, Any] = {
        "version": facts.version,
        "resize_mode": "session (1 MiB)" if facts.session_resize else f"background (unit {facts.unit} bytes)",
        "resize_unit_bytes": facts.unit,
        "resize_status": s.get("Innodb_buffer_pool_resize_status", ""),
        "pages_total": int(s.get("Innodb_buffer_pool_pages_total", 0)),
        "pages_free": int(s.get("Innodb_buffer_pool_pages_free", 0)),
        "pages_data": pages_data,
        "pages_dirty": int(s.get("Innodb_buffer_pool_pages_dirty", 0)),
        "read_requests": requests,
        "reads": reads,
        "server_rss_bytes": server_rss,
        "buffer_pool_floor": pool.floor,
        "auto_shrink_min": pool.auto_shrink_min,
        "missing_grants": missing_grants(facts.grants, facts.mariadb),
        "caches": {c: int(r.variables[c]) for c in shrink_caches if c in r.variables},
        **notes,
    }
    if r.performance_schema:
        extra["memory_global_total"] = r.memory_global_total
    return DbStats(
        name=name, kind="mysql", up=True, server_pid=server_pid, identity=identity,
        data_directory=r.variables["datadir"],
        roles={server_pid: Role.MYSQLD} if server_pid else {},
        sessions=tuple(sessions), pending_bytes=pending_bytes(sessions, server_anon),
        cache_bytes=pool.size, cache_configured_bytes=pool.configured, cache_used_bytes=pages_data * facts.page_size,
        hit_ratio=(1 - reads / requests) if requests else None,
        shrink_step=step, shrink_steps_max=top, grow_bytes=grow,
        resize_in_progress=pool.resize_in_progress, self_shrunk_ago=pool.self_shrunk_ago, extra=extra)
