"""PgBouncer: fewer server connections at once while the database's sessions press, through its
admin console (SET default_pool_size; max_db_connections is left alone, see targets()), and put
back afterwards.

A lower pool size alone only stops new server connections (measured: under a steady load the
open ones are handed from client to client and never fall idle, so 6 of 8 still ran after
3 s at a pool size of 2); RECONNECT then closes each server connection once it is released
(between transactions in transaction pooling, when its client leaves in session pooling) and
new ones open only up to the new size. Clients beyond it wait in PgBouncer's queue (bounded by
its own query_wait_timeout) instead of running a backend each; nobody is disconnected. Never
PAUSE, never RELOAD (that would read pgbouncer.ini again and drop the DBA's own SETs too). A RELOAD
by someone else puts the file's values back: dbguard then sees step 0 and goes on from there.

The console speaks the simple query protocol only: psycopg's ClientCursor. The originals are
kept keyed by the process (pid, start time) and the console's endpoint.
"""
from __future__ import annotations

import time
from typing import Any

import psycopg

from ..databases.bounded import close_quietly
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
    max_db_connections is left as the DBA set it: measured with PgBouncer 1.18, lowering it to 2
    together with RECONNECT under load stalled every client for over a second, while a lower
    default_pool_size alone never did (tests/e2e/test_pgbouncer_pressure.py)."""
    return {"default_pool_size": linear_target(saved["default_pool_size"], floor, steps, step, 1)}


def to_stats(name: str, config: dict[str, str], pools: list[dict[str, Any]], saved: dict[str, int] | None,
             floor: int, steps: int, pid: int | None) -> CacheStats:
    pool = int(config.get("default_pool_size", "0"))
    configured = int(saved["default_pool_size"]) if saved else pool
    top = shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, 1))
    step = linear_step_of(pool, configured, floor, steps, 1) if saved else 0
    in_use = sum(int(p.get("sv_active", 0)) + int(p.get("sv_used", 0)) + int(p.get("sv_idle", 0))
                 for p in pools if p.get("database") != "pgbouncer")
    waiting = sum(int(p.get("cl_waiting", 0)) for p in pools)
    return CacheStats(name=name, kind="pgbouncer", up=True, pooler=True, unit="connections", server_pid=pid,
                      memory=in_use, limit=pool, configured=configured, shrink_step=step, shrink_steps_max=top,
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

    def _read(self) -> tuple[dict[str, str], list[dict[str, Any]], dict[str, int] | None, int | None]:
        config = {r["key"]: str(r["value"]) for r in self._rows("SHOW CONFIG")}
        pools = self._rows("SHOW POOLS")
        if self._pid is None or read_proc(self._pid) is None:
            from .endpoint import listener_pid
            self._pid = listener_pid(self.ep) if self.ep is not None else None
        proc = read_proc(self._pid) if self._pid else None
        self._identity = {"pid": str(self._pid or ""), "started": str(proc.start_time if proc else ""),
                          "endpoint": str(self.ep)}
        return config, pools, self.originals.load(), self._pid

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
            config, pools, saved, pid = self._read()
        except Exception as e:          # never into the loop
            self._drop()
            self._down = CacheStats(name=self.name, kind=self.kind, up=False, pooler=True, unit="connections",
                                    error=self._explain(e))
            self._retry_at = time.monotonic() + RETRY_DOWN
            return self._down
        self._down = None
        return to_stats(self.name, config, pools, saved, self.cfg.pool_floor, self.cfg.shrink_steps, pid)

    def set_shrink_step(self, step: int) -> Outcome:
        try:
            config, pools, saved, pid = self._read()
            s = to_stats(self.name, config, pools, saved, self.cfg.pool_floor, self.cfg.shrink_steps, pid)
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
            lowered = any(int(config.get(k, "0")) > v for k, v in want.items())
            if lowered:
                # A lower pool size only stops new server connections: under load the ones open are
                # handed from client to client and never fall idle for PgBouncer to close. RECONNECT
                # closes each after it is released (between transactions in transaction pooling);
                # nobody is disconnected and new ones open only up to the new size.
                self._console().execute("RECONNECT")
                changed.append("server connections reconnect as they are released")
            if step == 0:
                self.originals.clear()
        except Exception as e:
            self._drop()
            return Outcome.failed(self._explain(e))
        return Outcome.done(f"{'; '.join(changed) or 'pool sizes as they were'} (step {step}/{s.shrink_steps_max}); "
                            f"{s.memory} server connection(s), {s.extra['clients_waiting']} client(s) waiting")

    def close(self) -> None:
        self._drop()
