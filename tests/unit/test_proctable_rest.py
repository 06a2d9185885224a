"""The process table at rest on the fixture /proc (tests/fixtures/proc): the largest processes
found from the heap of readings, and the slow sweep covering every process once per round.
Oracle: sense.procfs.read_procs of the same tree, sorted by the test."""
from __future__ import annotations

from pathlib import Path

from dbguard.sense.procfs import read_procs
from dbguard.sense.proctable import ProcTable

FIXTURE = str(Path(__file__).resolve().parent.parent / "fixtures" / "proc")


def _user_by_rss() -> list[int]:
    procs = read_procs(FIXTURE)
    return [p.pid for p in sorted(procs.values(), key=lambda p: -p.rss_bytes) if not p.kernel_thread]


def test_largest_are_the_largest_user_processes():
    table = ProcTable(root=FIXTURE, top=3)
    table.refresh(fresh=False)
    want = _user_by_rss()
    assert sorted(table._largest()) == sorted(want[:3])
    # asked again (each cycle at rest), the same answer: entries are put back
    assert sorted(table._largest()) == sorted(want[:3])


def test_a_process_gone_from_the_table_leaves_the_largest():
    table = ProcTable(root=FIXTURE, top=2)
    table.refresh(fresh=False)
    want = _user_by_rss()
    del table.procs[want[0]]
    assert sorted(table._largest()) == sorted(want[1:3])


def test_the_sweep_reads_every_user_process_once_per_round():
    table = ProcTable(root=FIXTURE)
    table.refresh(fresh=False)
    user = set(_user_by_rss())
    seen: list[int] = []
    while len(seen) < len(user):
        seen += table._sweep_next(2)
    assert sorted(seen) == sorted(user)
    assert set(table._sweep_next(len(user) + 5)) == user      # a new round, never more than all


def test_changed_names_what_was_read_and_what_went():
    table = ProcTable(root=FIXTURE, sweep_seconds=1e9, top=1)
    table.refresh(fresh=False)
    assert set(table.procs) <= table.take_changed()     # all born (and those that vanished)
    table.procs[999999] = table.procs[next(iter(table.procs))]      # listed no more: gone
    table._listed_at = float("-inf")
    table.refresh(fresh=False)
    changed = table.take_changed()
    assert 999999 in changed and 999999 not in table.procs
    # besides the gone one and 960 (caught vanishing, so tried again): the largest and one of the sweep
    assert len(changed - {999999, 960}) <= 2 < len(table.procs)
    assert table.take_changed() == set()


def test_a_process_read_again_at_the_same_size_is_counted_once():
    table = ProcTable(root=FIXTURE, top=3)
    table.refresh(fresh=False)
    want = _user_by_rss()
    for _ in range(3):
        table._put(want[0], table.procs[want[0]])       # read again, nothing changed
    assert sorted(table._largest()) == sorted(want[:3])


def test_the_heap_keeps_the_largest_readings_not_one_per_process():
    """Pushed far more readings than it keeps (every process read again and again), the heap
    stays bounded and still gives the largest."""
    table = ProcTable(root=FIXTURE, top=2)
    table.refresh(fresh=False)
    want = _user_by_rss()
    for _ in range(40):
        for pid in want:
            table._put(pid, table.procs[pid])
        assert sorted(table._largest()) == sorted(want[:2])
    assert len(table._by_rss) <= 2 * 4 * 2 + 64 + len(want)


def _swept_over(table: ProcTable, cycles: int, seconds: float) -> int:
    """Processes the sweep handed out over `cycles` refreshes at rest, `seconds` apart (the
    table's clock set back by that much before each)."""
    swept, sweep_next = [], table._sweep_next

    def spy(n: int) -> list[int]:
        got = sweep_next(n)
        swept.extend(got)
        return got
    table._sweep_next = spy
    for _ in range(cycles):
        table._last -= seconds
        table.refresh(fresh=False)
    return len(swept)


def test_the_sweep_keeps_its_pace_where_a_cycle_is_owed_less_than_one_process():
    """A host of N processes swept every 3 N seconds, at 1 s a cycle, owes a third of one each
    cycle: 10 reads in 30 cycles (it read one every cycle, 30, a round 3 times too fast)."""
    table = ProcTable(root=FIXTURE, top=0)
    table.refresh(fresh=False)
    table.sweep_seconds = 3.0 * len(table.procs)
    assert _swept_over(table, 30, 1.0) in (9, 10)


def test_a_sweep_of_a_long_period_reads_nothing_in_a_few_cycles():
    table = ProcTable(root=FIXTURE, top=0, sweep_seconds=1e9)
    table.refresh(fresh=False)
    assert _swept_over(table, 30, 1.0) == 0
