"""Which memory.events changes are news a cycle must see at once (the hard limit reached, an
OOM) and which are throttling at memory.high, which the kernel reports dozens of times a second."""
from dbguard.sense.memtext import limit_event_kind, parse_flat_keyed

BEFORE = parse_flat_keyed("low 0\nhigh 120\nmax 3\noom 0\noom_kill 0\noom_group_kill 0\n")


def _after(**rose: int) -> dict[str, int]:
    return {k: v + rose.get(k, 0) for k, v in BEFORE.items()}


def test_throttling_alone_is_high():
    assert limit_event_kind(BEFORE, _after(high=40)) == "high"
    assert limit_event_kind(BEFORE, _after(low=1)) == "high"


def test_the_hard_limit_or_an_oom_is_limit_whatever_else_rose():
    for key in ("max", "oom", "oom_kill", "oom_group_kill"):
        assert limit_event_kind(BEFORE, _after(high=7, **{key: 1})) == "limit", key


def test_a_file_that_could_not_be_compared_is_limit():
    # The first read failed or the file came back empty: the safe reading is the urgent one.
    assert limit_event_kind({}, BEFORE) == "limit"
    assert limit_event_kind(BEFORE, {}) == "limit"


def test_a_kernel_without_oom_group_kill_compares_what_it_has():
    older = {k: v for k, v in BEFORE.items() if k != "oom_group_kill"}
    assert limit_event_kind(older, {**older, "high": 121}) == "high"
    assert limit_event_kind(older, {**older, "max": 4}) == "limit"


def test_a_notification_with_nothing_new_is_no_wake_up():
    """A deferred notification whose count the last read already saw: in the v2 test VM it woke
    a wait as "high" on a cgroup that has no memory.high (test_pressure's few-ms-stall test)."""
    assert limit_event_kind(BEFORE, dict(BEFORE)) == ""
    assert limit_event_kind(BEFORE, {**BEFORE, "newkey": 0}) == ""
