"""A setting's server-wide value as the DBA set it, from pg_settings and pg_file_settings rows. Pure.

dbguard's own session is no witness: an `ALTER ROLE dbguard SET work_mem` or an `ALTER
DATABASE ... SET` shows in its pg_settings row (source "user", "database", ...) but is not what
every other session gets. The server-wide value is the last entry for the name in the
configuration files (pg_file_settings, in the order the server reads them: postgresql.auto.conf,
written by ALTER SYSTEM, last), else the built-in default. Where it comes from decides how it
goes back: an auto.conf entry by `ALTER SYSTEM SET` with the DBA's own text, anything else by
`ALTER SYSTEM RESET`.
"""
from __future__ import annotations

import dataclasses
import re

from ..held import Live
from .stats import MULTIPLIERS, number_literal, setting_bytes, size_literal, unit_bytes

AUTO_CONF = "postgresql.auto.conf"

# pg_settings.source values that come from the session, not from the server-wide configuration.
SESSION_SOURCES = frozenset({"database", "user", "database user", "client", "session", "interactive", "test"})

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(B|kB|MB|GB|TB)?\s*$")
_UNITS = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclasses.dataclass(frozen=True)
class Row:
    """One pg_settings row as dbguard's session sees it."""

    name: str
    setting: str
    unit: str | None
    source: str
    sourcefile: str | None
    boot_val: str


@dataclasses.dataclass(frozen=True)
class Entry:
    """One pg_file_settings row (a line of a configuration file), in the order the server reads them."""

    name: str
    setting: str
    sourcefile: str | None

    @property
    def auto_conf(self) -> bool:
        return (self.sourcefile or "").endswith("/" + AUTO_CONF)


def size_bytes(text: str, unit: str | None) -> int | None:
    """Bytes of a memory value as written in a configuration file ('64MB', '65536' in `unit`s,
    '1.5GB'); None when it is not one."""
    m = _SIZE_RE.match(text or "")
    per = unit_bytes(unit)
    if not m or per is None:
        return None
    return round(float(m.group(1)) * (_UNITS[m.group(2)] if m.group(2) else per))


def auto_conf_entries(entries: list[Entry]) -> dict[str, str]:
    """The text of each name's postgresql.auto.conf entry (the last one counts)."""
    return {e.name: e.setting for e in entries if e.auto_conf}


def server_wide(row: Row, entries: list[Entry] | None, user: str) -> dict | str:
    """{"value", "bytes", "auto_conf"}: the DBA's server-wide value of `row.name`, or one line
    saying why it cannot be known. `entries`: pg_file_settings rows, None when not readable.
    A multiplier (stats.MULTIPLIERS) has "number" instead of "bytes"."""
    if row.name in MULTIPLIERS:
        return _multiplier(row, entries, user)
    if entries is not None:
        mine = [e for e in entries if e.name == row.name]
        if mine:
            last = mine[-1]
            nbytes = size_bytes(last.setting, row.unit)
            if nbytes is None and row.source not in SESSION_SOURCES:
                nbytes = setting_bytes(row.setting, row.unit)
            if nbytes is None:
                return f"{row.name}: cannot read {last.setting!r} from {last.sourcefile} as a size"
            return {"value": last.setting if last.auto_conf else size_literal(nbytes), "bytes": nbytes,
                    "auto_conf": last.auto_conf}
        # In no file: the built-in default (or the server's command line, which our session shows
        # unless a role or database setting hides it).
        value = row.boot_val if row.source in SESSION_SOURCES else row.setting
        nbytes = setting_bytes(value, row.unit)
        return {"value": size_literal(nbytes), "bytes": nbytes, "auto_conf": False} if nbytes is not None else \
            f"{row.name}: {value!r} is not a size"
    if row.source in SESSION_SOURCES:
        return (f"{row.name}: dbguard's own session takes it from ALTER ROLE/ALTER DATABASE ... SET (source "
                f"{row.source}), which hides the server-wide value: connect as a superuser or "
                f"GRANT SELECT ON pg_file_settings TO {user}")
    if row.source == "configuration file" and row.sourcefile is None:
        # Without the file name we cannot tell ALTER SYSTEM from postgresql.conf, so we could not
        # put the DBA's setting back exactly: refuse rather than guess.
        return (f"cannot tell where {row.name} is set (pg_settings.sourcefile hidden): connect as a superuser "
                f"or GRANT pg_read_all_settings TO {user}")
    nbytes = setting_bytes(row.setting, row.unit)
    if nbytes is None:
        return f"{row.name}: {row.setting!r} is not a size"
    return {"value": size_literal(nbytes), "bytes": nbytes,
            "auto_conf": (row.sourcefile or "").endswith("/" + AUTO_CONF)}


def _multiplier(row: Row, entries: list[Entry] | None, user: str) -> dict | str:
    """server_wide() of a plain number: the same sources, its text kept as written."""
    mine = [e for e in entries or () if e.name == row.name]
    if mine:
        text, auto_conf, where = mine[-1].setting, mine[-1].auto_conf, f"from {mine[-1].sourcefile}"
    elif entries is None and row.source in SESSION_SOURCES:
        return (f"{row.name}: dbguard's own session takes it from ALTER ROLE/ALTER DATABASE ... SET (source "
                f"{row.source}), which hides the server-wide value: connect as a superuser or "
                f"GRANT SELECT ON pg_file_settings TO {user}")
    elif entries is None and row.source == "configuration file" and row.sourcefile is None:
        return (f"cannot tell where {row.name} is set (pg_settings.sourcefile hidden): connect as a superuser "
                f"or GRANT pg_read_all_settings TO {user}")
    else:
        text = row.boot_val if row.source in SESSION_SOURCES else row.setting
        auto_conf, where = entries is None and (row.sourcefile or "").endswith("/" + AUTO_CONF), "as a number"
    try:
        number = float(text)
    except ValueError:
        return f"{row.name}: cannot read {text!r} {where}"
    return {"value": text if auto_conf else number_literal(number), "number": number, "auto_conf": auto_conf}


def live_entry(row: Row | None, entries: list[Entry] | None, name: str) -> Live:
    """What is in postgresql.auto.conf for `name` now: the exact text from pg_file_settings;
    without it, from pg_settings as the size literal dbguard itself writes (so a value of ours
    compares equal), or not known when a role or database setting hides the server-wide row."""
    if entries is not None:
        return Live(auto_conf_entries(entries).get(name))
    if row is None or row.source in SESSION_SOURCES or (row.source == "configuration file" and row.sourcefile is None):
        return Live(None, known=False)
    if (row.sourcefile or "").endswith("/" + AUTO_CONF):
        if name in MULTIPLIERS:
            return Live(number_literal(float(row.setting)))
        nbytes = setting_bytes(row.setting, row.unit)
        return Live(size_literal(nbytes) if nbytes is not None else row.setting)
    return Live(None)

