"""The DBA's original settings, kept on disk while dbguard has them changed.

Written (atomically, fsync'd) before the first change to a database's settings and
removed once they are back, so a dbguard killed half-way puts them back at its next start.
One JSON file per database under the state directory.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


class Originals:
    def __init__(self, state_dir: str | os.PathLike, database: str):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", database)
        self.path = Path(state_dir) / f"originals-{safe}.json"

    def load(self) -> dict[str, Any] | None:
        """The saved originals, or None when nothing is changed."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, values: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(values, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
