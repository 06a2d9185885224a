"""The DBA's original settings, kept on disk while dbguard has them changed.

Written (atomically, fsync'd, never through a link) before the first change to a database's
settings and removed once they are back, so a dbguard killed half-way puts them back at its
next start. One JSON file per database under the state directory.

A file that does not fit its schema (damaged, hand-edited, a planted link) is moved aside as
`<file>.damaged-<time>` with one warning saying what to put back by hand; protection goes on
without it (the database's current settings count as the DBA's from then on).

The file is keyed by the server, not only by the config name: it records the identity of the
server it was written for (PostgreSQL: system_identifier and data directory; MariaDB/MySQL: see
databases/mysql/identity.py), and a file of another server (a cluster re-created under the same
name, an endpoint that now leads elsewhere) is never applied: it is moved aside as
`<file>.other-server-<time>` with one warning. A file without an identity (written before
dbguard recorded one) is left to the adapter, which applies it only where the values in place
are the ones dbguard set (databases/held.py); the next save records the identity.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

from . import fsafe
from .escape import printable

log = logging.getLogger("dbguard")

# A schema is a type (int: a count or size, never negative; float: any finite number; str;
# bool), a dict of fixed keys (a key ending in "?" may be missing), or {str: schema}: a map
# with any keys.
Schema = Any


def schema_problem(value: Any, schema: Schema, where: str = "") -> str | None:
    """What in `value` does not fit `schema` (the first thing found), None when it fits."""
    at = where or "top level"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{at}: expected an object"
        if set(schema) == {str}:
            for k, v in value.items():
                why = schema_problem(v, schema[str], f"{where}.{k}" if where else k)
                if why:
                    return why
            return None
        keys = {k.rstrip("?"): k.endswith("?") for k in schema}
        for k, optional in keys.items():
            if k not in value:
                if not optional:
                    return f"{at}: missing {k}"
                continue
            why = schema_problem(value[k], schema[k + "?" if optional else k], f"{where}.{k}" if where else k)
            if why:
                return why
        extra = sorted(set(value) - set(keys))
        return f"{at}: unexpected key {extra[0]}" if extra else None
    if schema is bool:
        ok = isinstance(value, bool)
    elif schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
    else:
        ok = isinstance(value, schema)
    return None if ok else f"{at}: expected {schema.__name__}{' >= 0' if schema is int else ''}, got {value!r}"[:200]


Identity = dict[str, str]


def other_server(saved: Identity | None, live: Identity | None) -> str | None:
    """Why the server a file was written for is not the live one (first fact that differs), None
    when they agree on every fact both know, or cannot be compared (one side unknown)."""
    for key in sorted(set(saved or {}) & set(live or {})):
        a, b = saved[key], live[key]
        if a and b and (os.path.normpath(a) if key.endswith("directory") else a) != \
                (os.path.normpath(b) if key.endswith("directory") else b):
            return f"{key} {printable(a)} there, {printable(b)} here"
    return None


class Originals:
    def __init__(self, state_dir: str | os.PathLike, database: str, schema: Schema = None, fix: str = "",
                 server: Callable[[], Identity | None] = lambda: None):
        """`schema`: what a good file holds; `fix`: what the DBA does by hand when it is damaged;
        `server()`: the live server's identity, None while it is not known."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", database)
        self.path = Path(state_dir) / f"originals-{safe}.json"
        self.schema = {**schema, "identity?": {str: str}} if isinstance(schema, dict) else schema
        self.fix = fix
        self.server = server
        self._warned = ""               # a file that cannot be moved aside is reported once


    def load(self) -> dict[str, Any] | None:
        """The saved originals, or None when nothing is changed (or the file was damaged)."""
        try:
            values = json.loads(fsafe.read_small(self.path))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a link planted where the file goes
                return self._damaged("a symbolic link")
            if str(e) != self._warned:  # not ours to read (explain as a user): not damaged
                self._warned = str(e)
                log.warning("%s: cannot read state file: %s", self.path, e.strerror)
            return None
        except RecursionError:
            return self._damaged("JSON nested thousands deep")
        except ValueError as e:         # not JSON (UnicodeDecodeError is one), not a regular file
            return self._damaged(f"{type(e).__name__}: {e}"[:200])
        why = schema_problem(values, self.schema) if self.schema is not None else None
        if why is not None:
            return self._damaged(why)
        other = other_server(values.get("identity"), self.server())
        return values if other is None else self._other_server(other)

    def _other_server(self, why: str) -> None:
        try:
            moved = f"moved aside to {fsafe.move_aside(self.path, 'other-server')}"
        except OSError as e:
            moved = f"could not move it aside ({e.strerror}): remove it"
        if why != self._warned:
            self._warned = why
            log.warning("%s: written for another server (%s), never applied to this one; %s; protection goes on",
                        self.path, why, moved)
        return None

    def _damaged(self, why: str) -> None:
        try:
            moved = f"moved aside to {fsafe.move_aside(self.path)}"
        except OSError as e:
            moved = f"could not move it aside ({e.strerror}): remove it"
        if why == self._warned:
            return None
        self._warned = why
        log.warning("%s: damaged state file (%s); %s; %sprotection goes on without it", self.path, printable(why),
                    moved, f"{self.fix}; " if self.fix else "")
        return None

    def save(self, values: dict[str, Any]) -> None:
        """`values` plus the live server's identity (kept from the file while it is not known)."""
        ident = self.server() or values.get("identity")
        values = {k: v for k, v in values.items() if k != "identity"} | ({"identity": ident} if ident else {})
        fsafe.ensure_dir(str(self.path.parent), "general.state_dir")
        fsafe.write_atomic(self.path, json.dumps(values, indent=1, sort_keys=True).encode())

    def clear(self) -> None:
        fsafe.remove(self.path)
