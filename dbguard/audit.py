"""The audit log: one JSON object per line for every decision dbguard carries out and its result.

Keys every record has: ts (epoch seconds), action, target, reason, level, result, path
("user" for dbguard's user-space loop, "bpf" for its in-kernel programs, "kernel" for what
the kernel did by itself). Records about a process carry its pid; database actions carry
the database name. Secrets never reach this file: DSNs and passwords are not in any action.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from .errors import DbguardError
from .model import Action, Level

log = logging.getLogger("dbguard")


class AuditLog:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise DbguardError(f"audit.path: cannot open {path} for appending: {e.strerror}; "
                               "create the directory or point audit.path elsewhere") from None
        self._f = os.fdopen(fd, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        record.setdefault("ts", time.time())
        record.setdefault("path", "user")
        line = json.dumps(record, default=str, sort_keys=False)
        with self._lock:
            self._f.write(line + "\n")
        log.info("%s %s: %s -> %s", record.get("action"), record.get("target"), record.get("reason"),
                 record.get("result"))
        return record

    def action(self, a: Action, level: Level, result: str, ok: bool, **extra: Any) -> dict[str, Any]:
        rec = {"ts": time.time(), "action": a.kind.value, "target": a.target, "reason": a.reason,
               "level": level.name.lower(), "result": result, "ok": ok, "dry_run": a.dry_run,
               "path": "user"}
        if a.pid is not None:
            rec["pid"] = a.pid
        if a.database is not None:
            rec["database"] = a.database
        if a.value is not None:
            rec["value"] = a.value
        rec.update(extra)
        return self.write(rec)

    def close(self) -> None:
        with self._lock:
            self._f.close()
