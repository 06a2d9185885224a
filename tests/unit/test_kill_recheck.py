"""The re-check right before a kill (assess.kill_still_needed): a kill planned a moment ago is
dropped only when the pressure is over, not when a reading dips a point under the goal.

Defaults: high mark 90%, hysteresis 5%, so the kill goal is 85% and a kill is dropped only
under 80% (figures below are MiB of a 1000 MiB limit, worked out by hand)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dbguard.settings import Pressure
from dbguard.assess import kill_still_needed, recheck
from dbguard.model import Level, MemoryReading

MiB = 1024 * 1024
P = Pressure()


def fresh(used_mib: float, *, full: float = 0.0, version: int = 1):
    return recheck(MemoryReading(cgroup="/sys/fs/cgroup/memory/lab", cgroup_version=version,
                                 usage_bytes=int(used_mib * MiB), limit_bytes=1000 * MiB,
                                 psi_some_avg10=0.0, psi_full_avg10=full), P)


def old_rule(a) -> bool:
    """The re-check before this change: the reading's level with the hysteresis at high."""
    return a.sustained >= Level.HIGH


def test_a_dip_a_point_under_the_goal_keeps_the_kill():
    a = fresh(840)                          # 84%: the VM run's skipped kill
    assert not old_rule(a)                  # the old rule threw it away
    needed, why = kill_still_needed(a, P)
    assert needed and "84%" in why and "85%" in why


def test_a_whole_hysteresis_under_the_goal_drops_the_kill():
    needed, why = kill_still_needed(fresh(790), P)         # 79% < 80%
    assert not needed and "79% < 80%" in why


def test_just_at_the_floor_keeps_the_kill():
    assert kill_still_needed(fresh(800), P)[0]             # 80%: not under 80%


def test_stalls_keep_the_kill():
    a = fresh(700, full=20.0, version=2)    # 70%, the scope's own PSI full 20% >= 10%
    needed, why = kill_still_needed(a, P)
    assert needed and "PSI full" in why


@given(used=st.integers(0, 1000), full=st.floats(0, 100), version=st.sampled_from([1, 2]))
def test_never_laxer_than_the_old_rule(used, full, version):
    a = fresh(used, full=full, version=version)
    if old_rule(a):
        assert kill_still_needed(a, P)[0]
