"""The benchmark report's pure helpers (benchmarks/stats.py)."""
from benchmarks.stats import (count_true, fmt_spread, interleave, markdown_table, ratio, spread,
                              windowed_tps)


def test_spread_ignores_missing_values_and_reports_range():
    s = spread([3.0, None, 1.0, 2.0])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert spread([None, None]) is None
    assert s.fmt("{:.1f}", " ms") == "2.0 ms (1.0-3.0)"


def test_single_value_has_no_range():
    assert fmt_spread([5]) == "5"
    assert fmt_spread([]) == "–"
    assert fmt_spread([4, 4]) == "4"


def test_windowed_tps_counts_silent_seconds_as_zero():
    progress = [(1.0, 100.0), (2.0, 100.0), (3.0, 50.0)]    # pgbench died after 3 s
    assert windowed_tps(progress, 0.0, 6.0) == (100 + 100 + 50) / 6
    assert windowed_tps(progress, 1.0, 3.0) == (100 + 50) / 2
    assert windowed_tps(progress, 2.0, 2.5) is None


def test_ratio_and_count():
    assert ratio(50, 200) == 0.25
    assert ratio(None, 200) is None and ratio(5, 0) is None
    assert count_true([True, False, None, True]) == (2, 3)


def test_interleave_alternates_contenders():
    assert interleave(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]


def test_markdown_table_escapes_pipes():
    out = markdown_table(["x", "y"], [["a|b", 1]])
    assert out.splitlines() == ["| x | y |", "| --- | --- |", "| a\\|b | 1 |"]
