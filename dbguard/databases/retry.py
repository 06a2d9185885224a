"""Connecting again after a transient failure, a few times within a bound.

Small on purpose: tenacity did this with its asyncio and tornado support imported at start
(asyncio alone is ~9 MiB of RSS in a daemon that talks only to MySQL/MariaDB).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def retry(call: Callable[[], T], transient: Callable[[Exception], bool], *, attempts: int, within: float,
          wait: Callable[[int], float]) -> T:
    """call() until it returns; again after wait(n) seconds when try n failed with an error
    transient() accepts, while fewer than `attempts` tries were made and `within` seconds have
    not passed since the first began. Otherwise the last error is raised as it was."""
    start = time.monotonic()
    tried = 0
    while True:
        tried += 1
        try:
            return call()
        except Exception as e:
            if not transient(e) or tried >= attempts or time.monotonic() - start >= within:
                raise
        time.sleep(wait(tried))


def exponential(first: float, most: float) -> Callable[[int], float]:
    """first, 2 x first, 4 x first, ... seconds after try 1, 2, 3, ..., never more than `most`."""
    return lambda n: min(most, first * 2 ** (n - 1))
