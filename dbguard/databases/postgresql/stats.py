"""PostgreSQL rows -> DbStats. Pure: no connection, no /proc; unit-tested from recorded rows
(tests/fixtures/databases/postgresql-*.json, captured from a real server by
tests/fixtures/databases/capture.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ...model import DbSession, DbStats, Role
from ..steps import halved, halvings_to_floor, shrink_steps_max

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

# One statement per cycle: sessions, the cache settings, the hit ratio (json: one round trip).
COLLECT_SQL = """
SELECT
  (SELECT coalesce(json_agg(json_build_array(pid, backend_type, state, usename, left(query, %(qmax)s),
            extract(epoch FROM now() - coalesce(CASE WHEN state = 'active' THEN query_start
                                                      ELSE state_change END, backend_start)),
            pid = pg_backend_pid(), leader_pid,
            extract(epoch FROM coalesce(CASE WHEN state = 'active' THEN query_start
                                             ELSE state_change END, backend_start)))), '[]'::json)
     FROM pg_stat_activity WHERE pid IS NOT NULL),
  (SELECT json_object_agg(name, json_build_array(setting, unit, sourcefile))
     FROM pg_settings WHERE name = ANY(%(names)s)),
  (SELECT sum(blks_hit)::float8 / nullif(sum(blks_hit) + sum(blks_read), 0) FROM pg_stat_database)
"""


def _started(rest: list[Any]) -> float | None:
    """The statement's start from the row's tail ([leader_pid, started]), when recorded."""
    return float(rest[1]) if len(rest) > 1 and rest[1] is not None else None


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


def setting_amount(name: str, setting: str, unit: str | None) -> float | None:
    """A pg_settings value as dbguard shrinks it: bytes of a size, the number of a multiplier."""
    if name in MULTIPLIERS:
        try:
            return float(setting)
        except ValueError:
            return None
    return setting_bytes(setting, unit)


def size_literal(nbytes: int) -> str:
    """A value PostgreSQL accepts for a memory setting, exact to the kB (its smallest unit)."""
    if nbytes % 1024**2 == 0:
        return f"{nbytes // 1024**2}MB"
    return f"{max(1, nbytes // 1024)}kB"


# Per-session memory settings that are no size: multipliers of work_mem, with their floor (the
# server's minimum). hash_mem_multiplier (PostgreSQL 13+): a hash table may use this many times
# work_mem before it spills.
MULTIPLIERS: dict[str, float] = {"hash_mem_multiplier": 1.0}


def number_literal(x: float) -> str:
    return f"{x:g}"


def shrunk(name: str, amount: float, floor: int, step: int) -> float:
    """A setting at `step`: a size halved toward shrink_floor, a multiplier toward its own floor."""
    if name in MULTIPLIERS:
        return amount if step <= 0 else min(amount, max(MULTIPLIERS[name], amount / 2**step))
    return halved(int(amount), floor, step)


def shrunk_literal(name: str, amount: float, floor: int, step: int) -> str:
    """What dbguard writes for a setting at `step`."""
    value = shrunk(name, amount, floor, step)
    return number_literal(value) if name in MULTIPLIERS else size_literal(int(value))


def amount_of(o: dict[str, Any]) -> float:
    """A saved original's amount: bytes of a size, the number of a multiplier."""
    return o["bytes"] if "bytes" in o else o["number"]


def steps_max(originals: dict[str, float], floor: int, configured_steps: int) -> int:
    """Halvings until the largest setting reaches its floor, capped by shrink_steps."""
    def reachable(name: str, amount: float) -> int:
        if name not in MULTIPLIERS:
            return halvings_to_floor(int(amount), floor)
        steps = 0
        while shrunk(name, amount, floor, steps) > MULTIPLIERS[name]:
            steps += 1
        return steps
    return shrink_steps_max(configured_steps, max((reachable(n, a) for n, a in originals.items()), default=0))


@dataclass(frozen=True)
class Reading:
    """What one collect read, as the server returned it (COLLECT_SQL's three columns)."""

    activity: list[list[Any]]            # [pid, backend_type, state, usename, query, age_seconds, is_self,
                                         #  leader_pid (PostgreSQL 13+), started (epoch); the last two
                                         #  absent in older recordings]
    settings: dict[str, list[Any]]       # name -> [setting, unit, sourcefile]
    hit_ratio: float | None
    used_buffers: int | None = None      # pg_buffercache, sampled now and then; None: not known
    block_size: int = 8192


def to_stats(name: str, r: Reading, *, server_pid: int | None, data_directory: str, identity: str = "",
             shrink_settings: tuple[str, ...], saved: dict[str, Any] | None, floor: int, steps: int,
             memory_of: Callable[[int], int], notes: dict[str, str],
             temp_of: Callable[[int], int] = lambda pid: 0) -> DbStats:
    """DbStats from one reading. `saved`: the originals file while dbguard has settings shrunk;
    `memory_of(pid)`: the private memory a session holds, `temp_of(pid)`: its open temporary
    files (read for active sessions only: an idle one has none); `notes`: one-line remarks for `extra`."""
    roles: dict[int, Role] = {}
    sessions = []
    counts: dict[str, int] = {}
    # A parallel query's workers each use work_mem of their own: what they hold is their
    # leader's session's (cancelling the leader ends them too). leader_pid is the leader's
    # pid on its workers (PostgreSQL 13+) and on the leader itself while it leads.
    workers: dict[int, tuple[int, int]] = {}
    for row in r.activity:
        pid, backend_type, state, leader = row[0], row[1], row[2], row[7] if len(row) > 7 else None
        if backend_type == "parallel worker" and leader and leader != pid:
            mem, temp = workers.get(leader, (0, 0))
            workers[leader] = (mem + memory_of(pid), temp + (temp_of(pid) if state == "active" else 0))
    for pid, backend_type, state, user, text, age, is_self, *rest in r.activity:
        backend_type = backend_type or ""
        counts[backend_type] = counts.get(backend_type, 0) + 1
        role = role_of(backend_type)
        roles[pid] = role
        if role is Role.PG_BACKEND and not is_self:
            w_mem, w_temp = workers.get(pid, (0, 0)) if backend_type != "parallel worker" else (0, 0)
            sessions.append(DbSession(pid=pid, kind=backend_type, state=state or "", user=user or "",
                                      query=text or "", age_seconds=float(age or 0.0),
                                      memory_bytes=memory_of(pid) + w_mem,
                                      temp_bytes=(temp_of(pid) if state == "active" else 0) + w_temp,
                                      client=backend_type == "client backend", started=_started(rest)))
    if server_pid:
        roles[server_pid] = Role.POSTMASTER
    sb = r.settings.get("shared_buffers")
    shared_buffers = (setting_bytes(sb[0], sb[1]) if sb else 0) or 0
    current = {n: b for n in shrink_settings if n in r.settings
               for b in [setting_amount(n, r.settings[n][0], r.settings[n][1])] if b is not None}
    # Steps count from the DBA's values: the saved originals while shrunk, else the current ones.
    originals = {n: amount_of(v) for n, v in saved["settings"].items()} if saved else current
    extra: dict[str, Any] = {"settings": {n: number_literal(b) if n in MULTIPLIERS else size_literal(int(b))
                                          for n, b in current.items()}, "backends": counts, **notes}
    return DbStats(
        name=name, kind="postgresql", up=True, server_pid=server_pid, identity=identity,
        data_directory=data_directory,
        roles=roles, sessions=tuple(sessions), cache_bytes=shared_buffers, cache_configured_bytes=shared_buffers,
        cache_used_bytes=(r.used_buffers or 0) * r.block_size, hit_ratio=r.hit_ratio,
        shrink_step=int(saved["step"]) if saved else 0, shrink_steps_max=steps_max(originals, floor, steps),
        extra=extra)


def down_stats(name: str, error: str, server_pid: int | None, data_directory: str, step: int,
               identity: str = "") -> DbStats:
    """No SQL: the postmaster found by fact still gets its role; protection goes on."""
    return DbStats(name=name, kind="postgresql", up=False, error=error, server_pid=server_pid, identity=identity,
                   data_directory=data_directory, roles={server_pid: Role.POSTMASTER} if server_pid else {},
                   shrink_step=step)
