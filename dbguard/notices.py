"""What the daemon says once about its databases, not every cycle: one stopped answering SQL,
one's server can no longer be identified (protection degraded), and when either ends."""
from __future__ import annotations

import logging
from typing import Iterable

from .databases import identity
from .model import DbStats

log = logging.getLogger("dbguard")


class DatabaseNotices:
    def __init__(self) -> None:
        self.degraded: dict[str, str] = {}       # database -> why its server is not identified
        self.down: set[str] = set()              # databases not answering SQL (said once)

    def note(self, databases: Iterable[DbStats]) -> None:
        dbs = tuple(databases)
        for s in dbs:
            if not s.up and s.name not in self.down:
                log.warning("database %s: %s (protection goes on without SQL; server pid %s by fact)",
                            s.name, s.error, s.server_pid)
            elif s.up and s.name in self.down:
                log.info("database %s answers SQL again", s.name)
        self.down = {s.name for s in dbs if not s.up}
        now = identity.degraded(dbs)
        for name in now.keys() - self.degraded.keys():
            log.warning("protection degraded: %s", now[name])
        for s in dbs:
            if s.name in self.degraded and s.name not in now:
                log.info("%s %s: server identified again (pid %s, %s)", s.kind, s.name, s.server_pid, s.identity)
        self.degraded = now
