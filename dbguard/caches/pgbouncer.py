"""PgBouncer: fewer server connections at once while the database's sessions press, through its
admin console (SET default_pool_size; max_db_connections is left alone, see targets()), and put
back afterwards.

A lower pool size alone only stops new server connections: under a steady load the open ones
are handed from client to client and never fall idle for PgBouncer's janitor to close them.
RECONNECT then closes each server connection once it is released (between transactions in
transaction pooling, when its client leaves in session pooling) and new ones open only up to
the new size; clients beyond it wait in PgBouncer's queue instead of running a backend each,
nobody is disconnected (tests/integration/test_pgbouncer.py; the figures, with SET alone and
with unpaced RECONNECTs beside them: benchmarks.giveback).

Two things make a step unsafe, and the adapter says so (`held`) so that the policy waits:
- RECONNECT while a server connection is still logging in fails that login, and PgBouncer then
  turns every client of the pool away for server_login_retry (15 s by default; seen with 1.18
  when a second RECONNECT went out while the first one's replacements logged in). So
  RECONNECT goes out only once no server connection is logging in (after a lower SET none
  starts: the pool is over its size), and a step whose RECONNECT could not go out is taken back.
- While the last step still takes effect (a pool holds more server connections than its size)
  the next one waits, so clients wait for one step's drain at a time; and the pool is not
  lowered further while a client has already waited a quarter of query_wait_timeout (past it
  PgBouncer disconnects the client with an error).

Never PAUSE, never RELOAD (that would read pgbouncer.ini again and drop the DBA's own SETs too). A
RELOAD by someone else puts the file's values back: dbguard then sees step 0 and goes on from there.

The console speaks the simple query protocol only: psycopg's ClientCursor. The originals are
kept keyed by the process (pid, start time) and the console's endpoint.
"""
from __future__ import annotations

import time
from typing import Any

from ..databases.bounded import close_quietly
from ..databases.postgresql.driver import psycopg     # without Python's ssl module
from ..databases.steps import linear_step_of, linear_steps_to_floor, linear_target, shrink_steps_max
from ..model import CacheStats, Outcome
from ..originals import Originals
from ..sense.procfs import read_proc
from .base import AppCache
from .registry import endpoint

RETRY_DOWN = 5.0
_SCHEMA = {"default_pool_size": int, "max_db_connections": int, "saved_at?": float}


def targets(saved: dict[str, int], floor: int, steps: int, step: int) -> dict[str, int]:
    """Pure: default_pool_size from its configured size to `floor` in `steps` linear steps.
    max_db_connections is left as the DBA set it: it caps all of a database's pools at once,
    also those with a pool_size of their own, which dbguard does not step."""
    return {"default_pool_size": linear_target(saved["default_pool_size"], floor, steps, step, 1)}


SERVERS = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
WAIT_SHARE = 0.25          # of query_wait_timeout a client may have waited before the pool stays where it is


def _n(row: dict[str, Any], key: str) -> int:
    return int(row.get(key) or 0)


def servers(row: dict[str, Any]) -> int:
    return sum(_n(row, k) for k in SERVERS)


def logging_in(pools: list[dict[str, Any]]) -> int:
    return sum(_n(p, "sv_login") for p in pools if p.get("database") != "pgbouncer")


def held(config: dict[str, str], pools: list[dict[str, Any]], sizes: dict[str, int]) -> str:
    """Pure: why the next step down waits now ('' when it need not). `sizes`: each database's
    pool size now (SHOW DATABASES)."""
    pools = [p for p in pools if p.get("database") != "pgbouncer"]       # its own console
    over = [(p["database"], servers(p), sizes[p["database"]]) for p in pools
            if p.get("database") in sizes and servers(p) > sizes[p["database"]] > 0]
    if over:
        db, n, size = over[0]
        return (f"the last step is still taking effect: {n} server connections for a pool of {size} in {db} "
                f"(each closes when released)")
    if logging_in(pools):
        return f"{logging_in(pools)} server connection(s) logging in (a RECONNECT now would fail their login)"
    qwt = float(config.get("query_wait_timeout") or 0)
    waited = max((_n(p, "maxwait") + _n(p, "maxwait_us") / 1e6 for p in pools), default=0.0)
    if qwt > 0 and waited >= WAIT_SHARE * qwt:
        return (f"a client has waited {waited:.1f} s for a server connection, {WAIT_SHARE:.0%} or more of "
                f"query_wait_timeout ({qwt:g} s): fewer would make clients fail")
    return ""


def to_stats(name: str, config: dict[str, str], pools: list[dict[str, Any]], sizes: dict[str, int],
             saved: dict[str, int] | None, floor: int, steps: int, pid: int | None) -> CacheStats:
    pool = int(config.get("default_pool_size", "0"))
    configured = int(saved["default_pool_size"]) if saved else pool
    top = shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, 1))
    step = linear_step_of(pool, configured, floor, steps, 1) if saved else 0
    in_use = sum(servers(p) for p in pools if p.get("database") != "pgbouncer")
    waiting = sum(_n(p, "cl_waiting") for p in pools)
    return CacheStats(name=name, kind="pgbouncer", up=True, pooler=True, unit="connections", server_pid=pid,
                      memory=in_use, limit=pool, configured=configured, shrink_step=step, shrink_steps_max=top,
                      held=held(config, pools, sizes),
                      extra={"max_db_connections": int(config.get("max_db_connections", "0")),
                             "clients_waiting": waiting})


class PgBouncer(AppCache):
    kind = "pgbouncer"
    pooler = True

    def __init__(self, cfg, state_dir: str):
        self.cfg = cfg
        self.name = cfg.name
        self.ep = endpoint(cfg, "poolers")
        self._identity: dict[str, str] | None = None
        self.originals = Originals(state_dir, f"pooler-{cfg.name}", _SCHEMA, fix=(
            f"check default_pool_size and max_db_connections of pgbouncer {cfg.name} (SHOW CONFIG)"),
            server=lambda: self._identity)
        self.conn: psycopg.Connection | None = None
        self._pid: int | None = None
        self._down: CacheStats | None = None
        self._retry_at = 0.0

    def _console(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            password = self.cfg.password()
            self.conn = psycopg.connect(self.cfg.dsn, autocommit=True, cursor_factory=psycopg.ClientCursor,
                                        connect_timeout=max(1, int(self.cfg.timeout)),
                                        **({"password": password} if password is not None else {}))
        return self.conn

    def _rows(self, sql: str) -> list[dict[str, Any]]:
        cur = self._console().execute(sql)
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def _read(self) -> tuple[dict[str, str], list[dict[str, Any]], dict[str, int], dict[str, int] | None,
                             int | None]:
        config = {r["key"]: str(r["value"]) for r in self._rows("SHOW CONFIG")}
        pools = self._rows("SHOW POOLS")
        sizes = {r["name"]: int(r.get("pool_size") or 0) for r in self._rows("SHOW DATABASES")}
        if self._pid is None or read_proc(self._pid) is None:
            from .endpoint import listener_pid
            self._pid = listener_pid(self.ep) if self.ep is not None else None
        proc = read_proc(self._pid) if self._pid else None
        self._identity = {"pid": str(self._pid or ""), "started": str(proc.start_time if proc else ""),
                          "endpoint": str(self.ep)}
        return config, pools, sizes, self.originals.load(), self._pid

    def _explain(self, e: Exception) -> str:
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        return (f"pgbouncer {self.name}: cannot use the admin console ({msg}); check dsn and "
                f"password_file/password_env in [[poolers]] {self.name}, and that its user is in admin_users")

    def _drop(self) -> None:
        close_quietly(self.conn)
        self.conn = None

    def collect(self) -> CacheStats:
        if self._down is not None and time.monotonic() < self._retry_at:
            return self._down
        try:
            config, pools, sizes, saved, pid = self._read()
        except Exception as e:          # never into the loop
            self._drop()
            self._down = CacheStats(name=self.name, kind=self.kind, up=False, pooler=True, unit="connections",
                                    error=self._explain(e))
            self._retry_at = time.monotonic() + RETRY_DOWN
            return self._down
        self._down = None
        return to_stats(self.name, config, pools, sizes, saved, self.cfg.pool_floor, self.cfg.shrink_steps, pid)

    def set_shrink_step(self, step: int) -> Outcome:
        try:
            config, pools, sizes, saved, pid = self._read()
            s = to_stats(self.name, config, pools, sizes, saved, self.cfg.pool_floor, self.cfg.shrink_steps, pid)
            step = max(0, min(step, s.shrink_steps_max))
            original = saved or {"default_pool_size": s.configured,
                                 "max_db_connections": int(config.get("max_db_connections", "0"))}
            want = targets(original, self.cfg.pool_floor, self.cfg.shrink_steps, step)
            if step > 0 and saved is None:
                self.originals.save({**original, "saved_at": time.time()})
            if step == 0:
                want = {k: original[k] for k in ("default_pool_size", "max_db_connections")}
            changed = []
            for key, value in want.items():
                if int(config.get(key, "0")) != value:
                    self._console().execute(f"SET {key} = {int(value)}")
                    changed.append(f"{key} {config.get(key)} -> {value}")
            if any(int(config.get(k, "0")) > v for k, v in want.items()):
                still = self._reconnect_when_no_login()
                if still:
                    for key in want:             # taken back: a lower size that cannot take effect
                        self._console().execute(f"SET {key} = {int(config.get(key, '0'))}")
                    if saved is None:
                        self.originals.clear()
                    return Outcome.refused(f"pgbouncer {self.name}: step {step} put off: {still} server "
                                           f"connection(s) still logging in after {self.cfg.timeout:g} s "
                                           f"(a RECONNECT would fail their login); pool sizes as they were")
                changed.append("server connections reconnect as they are released")
            if step == 0:
                self.originals.clear()
        except Exception as e:
            self._drop()
            return Outcome.failed(self._explain(e))
        return Outcome.done(f"{'; '.join(changed) or 'pool sizes as they were'} (step {step}/{s.shrink_steps_max}); "
                            f"{s.memory} server connection(s), {s.extra['clients_waiting']} client(s) waiting")

    def _reconnect_when_no_login(self) -> int:
        """RECONNECT once no server connection logs in (a lower size starts none; those in flight
        end within milliseconds), within the entry's timeout: 0, or how many still log in."""
        deadline = time.monotonic() + self.cfg.timeout
        while (n := logging_in(self._rows("SHOW POOLS"))) and time.monotonic() < deadline:
            time.sleep(0.01)
        if n == 0:
            self._console().execute("RECONNECT")
        return n

    def close(self) -> None:
        self._drop()
