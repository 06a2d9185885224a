"""Shrink steps: how big a cache is at step N, and how many steps there are. Pure arithmetic.

Step 0 is the DBA's size; each deeper step is smaller, never below a floor and never above
the original. Two ladders: halving (PostgreSQL's per-session settings, MySQL's runtime caches)
and linear in the server's resize unit (MySQL's buffer pool, where halving would reach the
floor in one or two steps).
"""
from __future__ import annotations

import math


def shrink_steps_max(configured_steps: int, steps_to_floor: int) -> int:
    """The deepest step: as many as configured, no more than it takes to reach the floor."""
    return max(0, min(configured_steps, steps_to_floor))


# --- halving -----------------------------------------------------------------------------------
def halved(original: int, floor: int, step: int) -> int:
    """original / 2**step, never below the floor and never above the original."""
    if step <= 0:
        return original
    return min(original, max(floor, original >> step))


def halvings_to_floor(original: int, floor: int) -> int:
    """How many halvings until `original` reaches the floor (0 if it is there already)."""
    steps = 0
    while original > floor and (original >> steps) > floor:
        steps += 1
    return steps


# --- linear, in the server's resize unit --------------------------------------------------------
def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit if unit > 1 else value


def linear_steps_to_floor(configured: int, floor: int, steps: int, unit: int = 1) -> int:
    """All `steps` when the floor, in the server's units, is below the configured size; else 0."""
    return steps if configured > round_up(floor, unit) else 0


def linear_target(configured: int, floor: int, steps: int, step: int, unit: int) -> int:
    """Size at `step`: 0 is the configured size, `steps` the floor, linear between.

    Rounded up to the server's resize unit so the server never rounds it below the floor.
    """
    if step <= 0 or not shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, unit)):
        return configured
    step = min(step, steps)
    raw = configured - (configured - floor) * step / steps
    return min(configured, max(round_up(math.ceil(raw), unit), round_up(floor, unit)))


def linear_step_of(current: int, configured: int, floor: int, steps: int, unit: int) -> int:
    """Which step a cache of `current` bytes is at: the deepest step whose size it does not exceed."""
    top = shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, unit))
    for s in range(top, 0, -1):
        if current <= linear_target(configured, floor, steps, s, unit):
            return s
    return 0
