"""Shrinking PostgreSQL's per-session memory settings, and putting the DBA's values back exactly.

Each step halves cfg.shrink_settings (never below shrink_floor nor above the original) with
ALTER SYSTEM + pg_reload_conf(): it applies to new sessions and to existing ones at their
next statement. Before the first change the DBA's server-wide originals are saved in the
originals file (serverwide.py: the value and whether it is an ALTER SYSTEM entry, never the
value dbguard's own session got from an ALTER ROLE/DATABASE ... SET); step 0 puts them back
exactly (ALTER SYSTEM SET x = the DBA's text, or ALTER SYSTEM RESET x) and removes the file.

The file also says what dbguard itself wrote into postgresql.auto.conf ("set", and while a
change is in flight the value before it, "was"). Before every change the entries in place are
compared with it (held.py): a setting someone else changed with ALTER SYSTEM while it was
shrunk is theirs from then on; dbguard lets go of it (its original dropped, one warning, one
line in the outcome) and never writes over it.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ...settings import DatabaseConfig
from ...errors import DbguardError
from ...escape import printable
from ...model import Outcome
from ...originals import Originals
from ..held import taken_over
from .driver import psycopg, sql     # without Python's ssl module
from .serverwide import Entry, Row, live_entry, server_wide
from .stats import MULTIPLIERS, amount_of, shrunk_literal, steps_max, unit_bytes

log = logging.getLogger("dbguard")


class Settings:
    def __init__(self, cfg: DatabaseConfig, originals: Originals):
        self.cfg = cfg
        self.originals = originals

    # --- the originals file ------------------------------------------------------------------
    def saved(self) -> dict[str, Any] | None:
        return self.originals.load()      # a damaged or foreign file is moved aside there, with one warning

    def current_step(self) -> int:
        try:
            saved = self.saved()
        except DbguardError:
            return 0
        return int(saved["step"]) if saved else 0

    def _ours(self, name: str, step: int, o: dict[str, Any]) -> list[str | None]:
        """What may be in postgresql.auto.conf for one setting without anyone else's doing: what
        dbguard set (a file written before "set" was recorded: the value its step gives), the
        value before a change that was in flight, and the DBA's original itself (None: no entry),
        which a restore would write again anyway."""
        return [o.get("set", shrunk_literal(name, amount_of(o), self.cfg.shrink_floor, step)),
                *([o["was"]] if "was" in o else []), o["value"] if o["auto_conf"] else None]

    # --- one step ------------------------------------------------------------------------------
    def set_step(self, conn: psycopg.Connection, step: int, superuser: bool) -> Outcome:
        saved = self.saved()
        if step == 0 and saved is None:
            return Outcome.done("settings are as configured")
        user = conn.info.user
        with conn.cursor() as cur:
            missing = self._missing_privilege(cur, superuser)
            if missing:
                return Outcome.failed(missing.replace("{user}", user))
            rows, entries = self._read(cur)
            notes: list[str] = []
            if saved is not None:
                saved, notes = self._let_go_of_theirs(saved, rows, entries)
            if step == 0:
                if saved is None:
                    return Outcome.done("; ".join(notes))
                self._restore(cur, saved["settings"], list(saved["settings"]))
                cur.execute("SELECT pg_reload_conf()")
                self.originals.clear()
                restored = ", ".join(f"{n}={v['value'] if v['auto_conf'] else 'RESET'}"
                                     for n, v in saved["settings"].items())
                return Outcome.done("; ".join([f"restored {restored}", *notes]))
            originals = saved["settings"] if saved else self._read_originals(rows, entries, user)
            top = steps_max({n: amount_of(o) for n, o in originals.items()}, self.cfg.shrink_floor,
                            self.cfg.shrink_steps)
            if top == 0:
                return Outcome.failed("; ".join([f"nothing to shrink: {', '.join(originals) or 'no setting'} already "
                                                 "at or below shrink_floor, or shrink_steps = 0", *notes]))
            step = min(step, top)
            saved_at = saved["saved_at"] if saved else time.time()
            previous = saved["step"] if saved else 0
            targets = {n: shrunk_literal(n, amount_of(o), self.cfg.shrink_floor, step) for n, o in originals.items()}
            # The originals are on disk before the first change, and what this step writes before
            # it writes it: a crash from here on is undone by recover(), and never mistaken for the DBA's.
            in_flight = {n: {**self._strip(o), "set": targets[n],
                             **({"was": self._ours(n, previous, o)[0]} if previous else {})}
                         for n, o in originals.items()}
            self.originals.save({"step": previous, "settings": in_flight, "saved_at": saved_at})
            self._apply(cur, targets, originals, previous, first=saved is None)
            done = {n: {**self._strip(o), "set": targets[n]} for n, o in originals.items()}
            self.originals.save({"step": step, "settings": done, "saved_at": saved_at})
            return Outcome.done("; ".join([f"step {step}: " + ", ".join(f"{n}={v}" for n, v in targets.items()),
                                           *notes]))

    @staticmethod
    def _strip(o: dict[str, Any]) -> dict[str, Any]:
        return {k: o[k] for k in ("value", "bytes", "number", "auto_conf") if k in o}

    def _let_go_of_theirs(self, saved: dict[str, Any], rows: dict[str, Row],
                          entries: list[Entry] | None) -> tuple[dict[str, Any] | None, list[str]]:
        """Drop the settings someone else changed by ALTER SYSTEM since dbguard set them."""
        settings = saved["settings"]
        live = {n: live_entry(rows.get(n), entries, n) for n in settings}
        gone = taken_over({n: self._ours(n, saved["step"], o) for n, o in settings.items()}, live)
        notes = []
        for n in gone:
            o = settings[n]
            now = live[n].value
            notes.append(f"{n} was changed by someone else while shrunk (postgresql.auto.conf now "
                         f"{printable(repr(now)) if now is not None else 'has no entry'}, dbguard had set "
                         f"{self._ours(n, saved['step'], o)[0]!r}): theirs is kept, dbguard's original "
                         f"{o['value'] if o['auto_conf'] else '(no ALTER SYSTEM entry)'} dropped")
            log.warning("database %s: %s", self.cfg.name, notes[-1])
        if not gone:
            return saved, []
        left = {n: o for n, o in settings.items() if n not in gone}
        if not left:
            self.originals.clear()
            return None, notes
        saved = {**saved, "settings": left}
        self.originals.save(saved)
        return saved, notes

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
                    self._alter(cur, name, shrunk_literal(name, amount_of(originals[name]), self.cfg.shrink_floor,
                                                          previous))
                cur.execute("SELECT pg_reload_conf()")
                if first:
                    self.originals.clear()
            except psycopg.Error:
                pass
            raise

    # --- SQL ------------------------------------------------------------------------------------
    def _read(self, cur: psycopg.Cursor) -> tuple[dict[str, Row], list[Entry] | None]:
        """pg_settings rows of our session, and the configuration files' entries when we may read
        them (superusers, or GRANT SELECT ON pg_file_settings); None when not."""
        names = list(self.cfg.shrink_settings)
        cur.execute("SELECT name, setting, unit, source, sourcefile, boot_val FROM pg_settings WHERE name = ANY(%s)",
                    [names])
        rows = {r[0]: Row(*r) for r in cur.fetchall()}
        cur.execute("SELECT has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')")
        if not cur.fetchone()[0]:
            return rows, None
        cur.execute("SELECT name, setting, sourcefile FROM pg_file_settings WHERE name = ANY(%s) AND error IS NULL "
                    "ORDER BY seqno", [names])
        return rows, [Entry(*r) for r in cur.fetchall()]

    def _read_originals(self, rows: dict[str, Row], entries: list[Entry] | None,
                        user: str) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.cfg.shrink_settings:
            if name not in rows and name in MULTIPLIERS:
                continue            # hash_mem_multiplier before PostgreSQL 13: nothing to shrink
            if name not in rows:
                raise DbguardError(f"databases.{self.cfg.name}.shrink_settings: {name} is not a PostgreSQL setting")
            if unit_bytes(rows[name].unit) is None and name not in MULTIPLIERS:
                raise DbguardError(f"databases.{self.cfg.name}.shrink_settings: {name} is not a memory size "
                                   f"setting nor one of {', '.join(MULTIPLIERS)}")
            value = server_wide(rows[name], entries, user)
            if isinstance(value, str):
                raise DbguardError(value)
            out[name] = value
        return out

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
