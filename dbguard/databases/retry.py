"""Connecting again after a transient failure, a few times within a bound: tenacity's
Retrying behind the one call both database connections make.

tenacity is imported with dbguard.lean's stand-in for asyncio, which it imports for its
AsyncRetrying (1.3 MiB of the daemon's RSS; benchmarks/RESULTS.md).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, TypeVar

from .. import lean

if "tenacity" not in sys.modules:
    lean.with_asyncio_on_call(lambda: importlib.import_module("tenacity"))

import tenacity  # noqa: E402  (loaded above)

T = TypeVar("T")


def retry(call: Callable[[], T], transient: Callable[[BaseException], bool], *, attempts: int, within: float,
          wait: Callable[[Any], float]) -> T:
    """call() until it returns; again after wait(retry state) seconds when a try failed with an
    error transient() accepts, while fewer than `attempts` tries were made and `within` seconds
    have not passed since the first began. Otherwise the last error is raised as it was."""
    return tenacity.Retrying(retry=tenacity.retry_if_exception(transient),
                             stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(within),
                             wait=wait, reraise=True)(call)


def exponential(first: float, most: float) -> Callable[[Any], float]:
    """first, 2 x first, 4 x first, ... seconds after try 1, 2, 3, ..., never more than `most`."""
    return tenacity.wait_exponential(multiplier=first, max=most)
