"""Shrinking PostgreSQL's per-session memory settings, and putting the DBA's values back exactly.

Each step halves cfg.shrink_settings (never below shrink_floor nor above the original) with
ALTER SYSTEM + pg_reload_conf(): it applies to new sessions and to existing ones at their
next statement. The DBA's originals (value, and whether they came from ALTER SYSTEM) are
saved in the originals file before the first change; step 0 puts them back exactly
(ALTER SYSTEM SET x = original, or ALTER SYSTEM RESET x) and removes the file.
"""
from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from ...config import DatabaseConfig
from ...errors import DbguardError
from ...model import Outcome
from ...originals import Originals
from ..steps import halved
from .stats import setting_bytes, size_literal, steps_max


class Settings:
    def __init__(self, cfg: DatabaseConfig, originals: Originals):
        self.cfg = cfg
        self.originals = originals

    # --- the originals file ------------------------------------------------------------------
    def saved(self) -> dict[str, Any] | None:
        return self.originals.load()      # a damaged file is moved aside there, with one warning

    def current_step(self) -> int:
        try:
            saved = self.saved()
        except DbguardError:
            return 0
        return int(saved["step"]) if saved else 0

    # --- one step ------------------------------------------------------------------------------
    def set_step(self, conn: psycopg.Connection, step: int, superuser: bool) -> Outcome:
        saved = self.saved()
        if step == 0 and saved is None:
            return Outcome.done("settings are as configured")
        with conn.cursor() as cur:
            missing = self._missing_privilege(cur, superuser)
            if missing:
                return Outcome.failed(missing.replace("{user}", conn.info.user))
            if step == 0:
                self._restore(cur, saved["settings"], list(saved["settings"]))
                cur.execute("SELECT pg_reload_conf()")
                self.originals.clear()
                restored = ", ".join(f"{n}={v['value']}" for n, v in saved["settings"].items())
                return Outcome.done(f"restored {restored}")
            originals = saved["settings"] if saved else self._read_originals(cur, superuser)
            top = steps_max({n: o["bytes"] for n, o in originals.items()}, self.cfg.shrink_floor,
                            self.cfg.shrink_steps)
            if top == 0:
                return Outcome.failed(f"nothing to shrink: {', '.join(originals)} already at or below "
                                      f"shrink_floor, or shrink_steps = 0")
            step = min(step, top)
            saved_at = saved["saved_at"] if saved else time.time()
            previous = saved["step"] if saved else 0
            # The originals are on disk before the first change: a crash from here on is undone by recover().
            self.originals.save({"step": previous, "settings": originals, "saved_at": saved_at})
            targets = {n: size_literal(halved(o["bytes"], self.cfg.shrink_floor, step)) for n, o in originals.items()}
            self._apply(cur, targets, originals, previous, first=saved is None)
            self.originals.save({"step": step, "settings": originals, "saved_at": saved_at})
            return Outcome.done(f"step {step}: " + ", ".join(f"{n}={v}" for n, v in targets.items()))

    def _apply(self, cur: psycopg.Cursor, targets: dict[str, str], originals: dict[str, dict[str, Any]],
               previous: int, first: bool) -> None:
        """All or nothing: on an error, put back what this step changed (best effort on a broken link)."""
        done: list[str] = []
        try:
            for name, value in targets.items():
                self._alter(cur, name, value)
                done.append(name)
            cur.execute("SELECT pg_reload_conf()")
        except psycopg.Error:
            try:
                if previous == 0:
                    self._restore(cur, originals, done)
                for name in done if previous else ():
                    self._alter(cur, name, size_literal(halved(originals[name]["bytes"], self.cfg.shrink_floor,
                                                               previous)))
                cur.execute("SELECT pg_reload_conf()")
                if first:
                    self.originals.clear()
            except psycopg.Error:
                pass
            raise

    # --- SQL ------------------------------------------------------------------------------------
    def _read_originals(self, cur: psycopg.Cursor, superuser: bool) -> dict[str, dict[str, Any]]:
        cur.execute("SELECT name, setting, unit, source, sourcefile FROM pg_settings WHERE name = ANY(%s)",
                    [list(self.cfg.shrink_settings)])
        rows = {r[0]: r for r in cur.fetchall()}
        written = self._auto_conf_text(cur) if superuser else {}
        out = {}
        for name in self.cfg.shrink_settings:
            if name not in rows:
                raise DbguardError(f"databases.{self.cfg.name}.shrink_settings: {name} is not a PostgreSQL setting")
            _, setting, unit, source, sourcefile = rows[name]
            nbytes = setting_bytes(setting, unit)
            if nbytes is None:
                raise DbguardError(f"databases.{self.cfg.name}.shrink_settings: {name} is not a memory size setting")
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
        cur.execute("SELECT name, setting, sourcefile FROM pg_file_settings WHERE name = ANY(%s) AND error IS NULL "
                    "ORDER BY seqno", [list(self.cfg.shrink_settings)])
        return {name: setting for name, setting, sourcefile in cur.fetchall()
                if (sourcefile or "").endswith("postgresql.auto.conf")}

    def _missing_privilege(self, cur: psycopg.Cursor, superuser: bool) -> str:
        """'' when every ALTER SYSTEM and the reload are allowed, else the one line saying what to grant."""
        if superuser:
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

    @staticmethod
    def _alter(cur: psycopg.Cursor, name: str, value: str | None) -> None:
        if value is None:
            cur.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        else:
            cur.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))

    def _restore(self, cur: psycopg.Cursor, originals: dict[str, dict[str, Any]], names: list[str]) -> None:
        for name in names:
            o = originals[name]
            self._alter(cur, name, o["value"] if o["auto_conf"] else None)
