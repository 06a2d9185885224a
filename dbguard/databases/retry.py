"""Connecting again after a transient failure, a few times within a bound: tenacity's
Retrying behind the one call both database connections make.

tenacity is imported at the first connect, not with this module: it imports asyncio, and
psycopg's driver (databases/postgresql/driver.py) has to be the first to import asyncio, so
that it comes without Python's ssl module (about 4 MiB of RSS; benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def retry(call: Callable[[], T], transient: Callable[[BaseException], bool], *, attempts: int, within: float,
          wait: Callable[[Any], float]) -> T:
    """call() until it returns; again after wait(retry state) seconds when a try failed with an
    error transient() accepts, while fewer than `attempts` tries were made and `within` seconds
    have not passed since the first began. Otherwise the last error is raised as it was."""
    import tenacity
    return tenacity.Retrying(retry=tenacity.retry_if_exception(transient),
                             stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(within),
                             wait=wait, reraise=True)(call)


def exponential(first: float, most: float) -> Callable[[Any], float]:
    """first, 2 x first, 4 x first, ... seconds after try 1, 2, 3, ..., never more than `most`."""
    import tenacity
    return tenacity.wait_exponential(multiplier=first, max=most)
