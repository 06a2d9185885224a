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


# --- the report's MariaDB rows, provenance, and which contenders run where ---------------------

def test_contenders_run_only_next_to_their_database():
    from benchmarks.contenders import for_database
    from benchmarks.run import CONTENDERS
    assert for_database(list(CONTENDERS), "mysql") == ["none", "mariadb-documented", "earlyoom", "dbguard-user",
                                                       "dbguard-bpf"]
    assert for_database(list(CONTENDERS), "postgresql") == ["none", "pg-documented", "earlyoom", "dbguard-user",
                                                            "dbguard-bpf"]


def _mariadb_run(contender, **kw):
    run = {"scenario": "moderate-hogs-mariadb", "contender": contender, "db_processes_killed": 0,
           "first_kill_at": 2.0, "db_restarts": 0, "db_up_at_end": True, "tx_failed": 0,
           "pool_configured_mib": 512, "pool_min_mib": 512, "pool_final_mib": 512, "pool_back_after_s": 0.0,
           "usage_at_load_mib": 608}
    run.update(kw)
    return run


def test_mariadb_rows_say_what_happened_to_the_server_and_its_pool():
    from benchmarks.tables import group, mariadb_rows
    runs = [_mariadb_run("none", db_processes_killed=1, db_up_at_end=False, pool_final_mib=None,
                         pool_back_after_s=None, tx_failed=4, first_kill_at=2.1),
            _mariadb_run("dbguard-user", pool_min_mib=128, pool_back_after_s=17.6),
            _mariadb_run("dbguard-user", pool_min_mib=128, pool_back_after_s=None, pool_final_mib=256),
            _mariadb_run("mariadb-documented", db_processes_killed=4, db_restarts=3, db_up_at_end=True)]
    rows = {r[0]: r for r in mariadb_rows(group(runs), "moderate-hogs-mariadb")}
    assert list(rows) == ["none", "mariadb-documented", "dbguard-user"]          # report order
    assert rows["none"][1:5] == ["1/1", "2100 ms", "0", "0/1"]
    assert rows["none"][6] == "512 → 512 → server down" and rows["none"][7] == "no"
    assert rows["mariadb-documented"][3] == "3" and rows["mariadb-documented"][4] == "1/1"
    assert rows["dbguard-user"][6] == "512 → 128 → 256 MiB; 512 → 128 → 512 MiB"
    assert rows["dbguard-user"][7] == "2/2; back at the configured size in 18 s (1 not)"


def test_provenance_one_line_per_invocation_when_merged():
    from benchmarks.report import _provenance_lines
    amd = {"kernel": "6.18-a", "cores": 2, "cpu": "AMD", "loadavg_start": ["5.0", "4.0", "3.0"]}
    intel = dict(amd, kernel="6.18-b", cpu="Intel", loadavg_start=["1.0", "0.5", "0.2"])
    single = {"date": "D1", "git": "g1", "command": "python -m benchmarks.run", "seconds": 10, "machine": amd}
    lines = _provenance_lines(single)
    assert lines[1] == "- Command (as root): `python -m benchmarks.run` (what `make bench` runs)"
    assert lines[2].startswith("- Machine: Linux 6.18-a, 2 cores (AMD)") and "load average at start 5.0" in lines[2]
    first = {"date": "D1", "git": "g1", "command": "python -m benchmarks.run", "seconds": 100, "machine": amd}
    merged = dict(single, provenance={
        "moderate-hogs": first, "fast-hog": first,
        "moderate-hogs-mariadb": {"date": "D2", "git": "g2", "command": "python -m benchmarks.run -s x --merge",
                                  "seconds": 900, "machine": intel}})
    lines = _provenance_lines(merged)
    assert len(lines) == 4
    assert lines[1].startswith("  - moderate-hogs, fast-hog: D1, git g1, `python -m benchmarks.run` (what")
    assert "took 100 s in all; machine: Linux 6.18-a, 2 cores (AMD)" in lines[1]
    assert lines[2].startswith("  - moderate-hogs-mariadb: D2, git g2, `python -m benchmarks.run -s x --merge`; "
                               "took 900 s; machine: Linux 6.18-b, 2 cores (Intel)")
    assert lines[2].endswith("load average at start 1.0 0.5 0.2")
    assert lines[3].startswith("- Machines: the machine behind this box changed")
    same = dict(merged, provenance={**merged["provenance"], "moderate-hogs-mariadb": dict(
        merged["provenance"]["moderate-hogs-mariadb"], machine=amd)})
    lines = _provenance_lines(same)
    assert "machine:" not in lines[2] and lines[3].startswith("- Machine: Linux 6.18-a")


def test_pool_moves_counts_resizes_while_hogs_lived_and_shrinks_after():
    from benchmarks.tables import group, pool_moves

    def act(t, action, level="warn"):
        return {"t": t, "action": action, "level": level}
    run = _mariadb_run("dbguard-user", timeline=[[23.1, "hogs left ended by the benchmark"]],
                       samples=[{"t": 23.0, "usage_mib": 830.0}, {"t": 23.5, "usage_mib": 352.0}],
                       guard_actions=[act(1, "shrink_cache"), act(1.5, "shrink_cache", "high"),
                                      act(2, "shrink_cache", "high"), act(8, "restore_cache", "ok"),
                                      act(13, "shrink_cache"), act(23.8, "shrink_cache"),
                                      act(30, "restore_cache", "ok")])
    (line,) = pool_moves(group([run]), "moderate-hogs-mariadb")
    assert "shrank the buffer pool 4 time(s) and grew it 1 time(s) per run (more shrinks than" in line
    assert "1 shrink(s) over 1 run(s) came after the benchmark had ended the hogs, at 352 MiB" in line


def test_rate_by_pool_takes_each_second_at_the_pool_size_of_its_middle():
    from benchmarks.tables import rate_by_pool
    run = {"params": {"duration": 10, "warmup": 4}, "pool_samples": [[-5, 512], [2.2, 128], [4.9, 256]],
           "tps_progress": [[-1, 900], [1, 1000], [2, 1000], [3, 400], [4, 500], [5, 450], [6, 700], [7, 50]]}
    assert rate_by_pool([run], min_seconds=1) == {512: (1000.0, 2), 128: (450.0, 3), 256: (700.0, 1)}
    assert rate_by_pool([run]) == {128: (450.0, 3)}
