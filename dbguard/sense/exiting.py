"""Victims killed whose exit is still freeing their memory.

The scope's reading still counts such a victim's pages, but they are on their way out: neither
the re-check before a kill nor the next plan should answer that memory again with a second
victim. A victim dbguard released at the kill (process_mrelease) is not here; one whose exit had
already let go of its mm when the release came (a task the BPF program killed in its own
context) is, with the memory it held at the last cycle, until it is a zombie or gone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..model import ProcKey
from .procfs import live_start_time

# An exit still running after this long is stuck (a task in D state), not freeing memory fast
# enough to wait for: what it holds counts as pressure again.
EXITING_FOR = 5.0


@dataclass
class Exiting:
    victims: dict[ProcKey, tuple[int, str, float]] = field(default_factory=dict)  # -> (bytes, scope, since)

    def add(self, key: ProcKey, held_bytes: int, scope: str, now: float | None = None) -> None:
        """`key`, killed, held `held_bytes` in `scope` (its watch's cgroup directory, "" the host)."""
        self.victims[key] = (held_bytes, scope, time.monotonic() if now is None else now)

    def bytes(self, scope: str, now: float | None = None) -> int:
        """The memory the victims of `scope` still exiting held; the others are forgotten."""
        now = time.monotonic() if now is None else now
        total = 0
        for key, (held, where, since) in list(self.victims.items()):
            if now - since > EXITING_FOR or live_start_time(key.pid) != key.start_time:
                del self.victims[key]
            elif where == scope:
                total += held
        return total
