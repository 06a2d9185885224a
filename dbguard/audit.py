"""The audit log: one JSON object per line for every decision dbguard carries out and its result.

Keys every record has: ts (epoch seconds), action, target, reason, level, result, path
("user" for dbguard's user-space loop, "bpf" for its in-kernel programs, "kernel" for what
the kernel did by itself). Records about a process carry its pid; database actions carry
the database name. Secrets never reach this file: DSNs and passwords are not in any action.

The file is opened without following a link, in a directory only root can write to
(dbguard.fsafe). A write that fails (a full disk, /dev/full, a file-size limit) never stops
protection: the record is lost, the error is logged once per kind and counted
(dbguard_audit_write_errors_total), and the caller carries on.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from typing import Any, Callable

from . import fsafe
from .errors import DbguardError
from .model import Action, Level

log = logging.getLogger("dbguard")


class AuditLog:
    def __init__(self, path: str, on_error: Callable[[str], None] | None = None):
        """`on_error(kind)` is told of every failed write (kind: "ENOSPC", "EFBIG", ...)."""
        self.path = path
        self.on_error = on_error
        self._lock = threading.Lock()
        self._fd = fsafe.open_append(path, "audit.path")
        self._failing: set[str] = set()      # kinds of write error logged since the last good write
        self._lost = 0
        self._torn = False                   # a write stopped mid-line: start the next on a new line

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        record.setdefault("ts", time.time())
        record.setdefault("path", "user")
        line = json.dumps(record, default=str, sort_keys=False) + "\n"
        with self._lock:
            self._append(line.encode())
        log.info("%s %s: %s -> %s", record.get("action"), record.get("target"), record.get("reason"),
                 record.get("result"))
        return record

    def _append(self, data: bytes) -> None:
        view = memoryview(b"\n" + data if self._torn else data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._torn = bool(view)
        except OSError as e:
            kind = errno.errorcode.get(e.errno, str(e.errno))
            self._lost += 1
            if kind not in self._failing:
                self._failing.add(kind)
                log.error("audit.path: cannot write to %s: %s (%s); protection goes on, audit records are lost "
                          "until it can be written again (dbguard_audit_write_errors_total counts them)",
                          self.path, e.strerror, kind)
            if self.on_error is not None:
                self.on_error(kind)
            return
        if self._failing:
            log.warning("audit.path: writing to %s again; %d record(s) were lost", self.path, self._lost)
            self._failing.clear()
            self._lost = 0

    def action(self, a: Action, level: Level, result: str, ok: bool, **extra: Any) -> dict[str, Any]:
        rec = {"ts": time.time(), "action": a.kind.value, "target": a.target, "reason": a.reason,
               "level": level.name.lower(), "result": result, "ok": ok, "dry_run": a.dry_run,
               "path": "user"}
        if a.pid is not None:
            rec["pid"] = a.pid
        if a.database is not None:
            rec["database"] = a.database
        if a.cache is not None:
            rec["cache"] = a.cache
        if a.value is not None:
            rec["value"] = a.value
        if a.scope:
            rec["scope"] = a.scope
        rec.update(extra)
        return self.write(rec)

    def reopen(self) -> None:
        """Append to whatever file is at the path now (SIGHUP: logrotate moved the old one
        away). If it cannot be opened, the records keep going to the file open so far."""
        try:
            fd = fsafe.open_append(self.path, "audit.path")
        except DbguardError as e:
            log.error("%s; the audit log stays the file opened before", e)
            return
        with self._lock:
            old, self._fd, self._torn = self._fd, fd, False
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
