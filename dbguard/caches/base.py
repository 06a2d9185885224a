"""The one interface the rest of dbguard uses to talk to an application cache or a pooler.

As for databases (databases/base.py): every method is safe to call when the server is down;
collect() then returns CacheStats(up=False, error=...), and set_shrink_step() an Outcome
that says what failed in one line. Nothing here raises into the main loop.
"""
from __future__ import annotations

import abc

from ..model import CacheStats, Outcome


class AppCache(abc.ABC):
    kind: str
    name: str
    pooler: bool = False

    @abc.abstractmethod
    def collect(self) -> CacheStats:
        """Size, limit, step, evictions, the server's pid. Bounded by the entry's timeout."""

    @abc.abstractmethod
    def set_shrink_step(self, step: int) -> Outcome:
        """Move the limit to exactly `step` (0 = as its owner configured it, shrink_steps_max =
        the floor). The originals are saved in the state directory before the first change and
        removed once step 0 is back, so a dbguard killed half-way puts them back at its start."""

    def recover(self) -> Outcome:
        """At start: what a previous run left lowered is stepped back by the caller, one step
        at a time, as at stop; skipped when nothing was left changed."""
        s = self.collect()
        if not s.up:
            return Outcome.skipped(s.error) if s.shrink_step == 0 else Outcome.failed(s.error)
        if s.shrink_step == 0:
            return Outcome.skipped("nothing to recover")
        return Outcome.done(f"a previous run left {self.kind} {self.name} at step {s.shrink_step} of "
                            f"{s.shrink_steps_max}; it grows back one step at a time")

    def close(self) -> None:
        """Drop connections."""
