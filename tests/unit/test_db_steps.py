"""dbguard.databases.steps: the two shrink ladders, by hand-worked values and by property."""
from __future__ import annotations

from hypothesis import given, strategies as st

from dbguard.databases.steps import (halved, halvings_to_floor, linear_step_of, linear_steps_to_floor, linear_target,
                                     round_up, shrink_steps_max)

MiB = 1024**2


def test_halving_respects_the_floor_and_never_raises():
    assert [halved(8 * MiB, 2 * MiB, s) for s in range(4)] == [8 * MiB, 4 * MiB, 2 * MiB, 2 * MiB]
    assert halved(MiB, 2 * MiB, 3) == MiB                  # below the floor already: never raised
    assert halvings_to_floor(64 * MiB, 2 * MiB) == 5 and halvings_to_floor(MiB, 2 * MiB) == 0
    # MySQL's runtime caches: table_open_cache 400 with minimum 64, three steps
    assert [halved(400, 64, min(s, 3)) for s in range(5)] == [400, 200, 100, 64, 64]


def test_deepest_step_is_the_config_capped_by_the_floor():
    assert shrink_steps_max(3, 5) == 3 and shrink_steps_max(5, 2) == 2
    assert shrink_steps_max(0, 5) == 0 and shrink_steps_max(3, 0) == 0
    # 160 MiB pool, 32 MiB floor, 3 steps: 160 -> 118 -> 75 -> 32 (MiB, rounded up to 1 MiB units)
    assert [linear_target(160 * MiB, 32 * MiB, 3, s, MiB) // MiB for s in range(4)] == [160, 118, 75, 32]
    assert linear_steps_to_floor(160 * MiB, 32 * MiB, 3, MiB) == 3
    assert linear_steps_to_floor(128 * MiB, 100 * MiB, 3, 128 * MiB) == 0   # the floor rounds up to the pool
    assert linear_step_of(60 * MiB, 160 * MiB, 32 * MiB, 3, MiB) == 2        # below step 2's 75 MiB


@given(configured=st.integers(1, 64 * 1024).map(lambda m: m * MiB),
       floor=st.integers(1, 64 * 1024).map(lambda m: m * MiB + 12345),
       steps=st.integers(1, 16), unit=st.sampled_from([1, MiB, 128 * MiB, 8 * 128 * MiB]))
def test_linear_targets_never_go_below_floor_and_shrink_monotonically(configured, floor, steps, unit):
    targets = [linear_target(configured, floor, steps, s, unit) for s in range(steps + 1)]
    assert targets[0] == configured
    if configured > round_up(floor, unit):
        assert all(t >= floor for t in targets)
        assert all(a >= b for a, b in zip(targets, targets[1:]))
        assert all(t % unit == 0 or t == configured for t in targets[1:])
        assert linear_target(configured, floor, steps, steps + 3, unit) == targets[-1]
        # Reading a size back gives a step at least as deep as the one that produced it.
        for s, t in enumerate(targets):
            assert linear_step_of(t, configured, floor, steps, unit) >= s
    else:
        assert targets == [configured] * (steps + 1)
