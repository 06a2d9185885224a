"""How dbguard logs to stderr: `--log-format text|json`, `--log-level`.

Under systemd, stderr goes to the journal, which stamps every line itself: the text format
then leaves out its own timestamp, and so does the JSON format (journald's is the one).
systemd says stderr is the journal by JOURNAL_STREAM=<dev>:<inode> of that stream.
"""
from __future__ import annotations

import json
import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


def to_journal(stream=None) -> bool:
    """Whether `stream` (stderr) is the journal stream systemd handed us."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (unless journald stamps it), level, message."""

    def __init__(self, stamp: bool):
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"ts": round(record.created, 3)} if self.stamp else {}
        out.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage())
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str, stream=None) -> None:
    stream = stream or sys.stderr
    stamp = not to_journal(stream)
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(stamp))
    else:
        handler.setFormatter(logging.Formatter(("%(asctime)s " if stamp else "") + "dbguard %(levelname)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
