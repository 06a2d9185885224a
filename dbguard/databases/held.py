"""Settings dbguard holds changed: whose value is in place now. Pure: unit-tested without a server.

While a cache is shrunk the DBA may change the same setting (ALTER SYSTEM, SET GLOBAL). Before
each grow or restore dbguard compares the value in place with the values it may have left
there itself: the one it last set and, while a change was in flight when it died, the one
before. Anything else was set by someone else: that value is theirs and is never overwritten,
and dbguard's original of that setting is dropped (what the DBA set last is the DBA's value).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Live:
    """The value in the place dbguard writes: a postgresql.auto.conf entry, a global variable.

    `value` None: no entry (nothing set there). `known` False: dbguard cannot see that place
    (a role without the privilege): then it cannot tell, and goes on as if the value were its own.
    """

    value: Any
    known: bool = True


def theirs(live: Live, ours: Iterable[Any], same: Callable[[Any, Any], bool] = operator.eq) -> bool:
    """True when the value in place is none of the values dbguard may have left there."""
    if not live.known:
        return False
    return not any(same(live.value, o) for o in ours)


def taken_over(held: dict[str, Iterable[Any]], live: dict[str, Live],
               same: Callable[[Any, Any], bool] = operator.eq) -> list[str]:
    """The held settings someone else changed since dbguard last set them, in `held`'s order.
    A setting without a live reading cannot be judged: it counts as dbguard's."""
    return [n for n, ours in held.items() if n in live and theirs(live[n], ours, same)]
