"""benchmarks.reclaim_latency.timed_kills: the episode arithmetic of the reclaim-to-kill tracer,
on event sequences whose answers are worked out by hand (the kernel side is
tests/e2e/test_reclaim_latency.py)."""
from __future__ import annotations

from benchmarks.reclaim_latency import BEGIN, END, KILL, MARK, SI_KERNEL, Event, timed_kills

MS = 1_000_000
CG, OTHER = 100, 200


def test_a_kill_is_timed_from_the_first_streak_of_the_episode():
    ev = [Event(10 * MS, BEGIN, 1, CG), Event(12 * MS, BEGIN, 2, CG),
          Event(15 * MS, KILL, 2, CG, sender=1, code=SI_KERNEL), Event(15 * MS, MARK, 2),
          Event(19 * MS, KILL, 1, CG, sender=99, code=0)]
    k1, k2 = timed_kills(ev, harness=set())
    assert (k1.path, k1.ms, k1.first) == ("kernel", 5.0, True)
    assert (k2.path, k2.ms, k2.first) == ("user", 9.0, False)       # the same episode, still going


def test_an_episode_ends_when_no_thread_is_failing_and_the_next_starts_afresh():
    ev = [Event(10 * MS, BEGIN, 1, CG), Event(20 * MS, END, 1), Event(500 * MS, BEGIN, 1, CG),
          Event(503 * MS, KILL, 1, CG, sender=1, code=SI_KERNEL)]
    (k,) = timed_kills(list(reversed(ev)), harness=set())         # events come in any order
    assert (k.path, k.ms, k.first) == ("bpf", 3.0, True)


def test_other_cgroups_and_kills_with_no_episode():
    ev = [Event(10 * MS, BEGIN, 1, OTHER), Event(11 * MS, KILL, 5, CG, sender=7, code=0)]
    (k,) = timed_kills(ev, harness={7})
    assert (k.path, k.ms, k.first) == ("harness", None, False)


def test_sigint_counts_an_episode_that_just_ended():
    ev = [Event(10 * MS, BEGIN, 1, CG), Event(20 * MS, END, 1), Event(30 * MS, KILL, 1, CG, sender=3)]
    assert timed_kills(ev, harness=set(), sig=2)[0].ms == 20.0
    assert timed_kills(ev, harness=set(), sig=9)[0].ms is None
