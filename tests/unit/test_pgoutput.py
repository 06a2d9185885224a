"""The server log's crashes, counted from PostgreSQL 15's lines: a backend the kernel OOM-killed
(the postmaster's three lines of it as a CI run's log had them on 2026-12-03, with the recovery
that follows) and a clean start and fast shutdown."""
from __future__ import annotations

from lab.pgoutput import count_crash_recoveries, server_log_victims

CRASH = """\
2026-12-03 05:04:52.101 UTC [13255] postmaster LOG:  database system is ready to accept connections
2026-12-03 05:04:55.497 UTC [13255] postmaster LOG:  server process (PID 13284) was terminated by signal 9: Killed
2026-12-03 05:04:55.497 UTC [13255] postmaster DETAIL:  Failed process was running: SELECT count(*) FROM (SELECT g)
2026-12-03 05:04:55.497 UTC [13255] postmaster LOG:  terminating any other active server processes
2026-12-03 05:04:55.499 UTC [13255] postmaster LOG:  all server processes terminated; reinitializing
2026-12-03 05:04:55.521 UTC [13290] LOG:  database system was interrupted; last known up at 2026-12-03 05:04:52 UTC
2026-12-03 05:04:55.611 UTC [13290] LOG:  database system was not properly shut down; automatic recovery in progress
2026-12-03 05:04:55.690 UTC [13255] postmaster LOG:  database system is ready to accept connections
"""
CLEAN = """\
2026-12-03 05:04:52.101 UTC [13255] postmaster LOG:  database system is ready to accept connections
2026-12-03 05:04:58.101 UTC [13255] postmaster LOG:  received fast shutdown request
2026-12-03 05:04:58.120 UTC [13257] LOG:  shutting down
2026-12-03 05:04:58.180 UTC [13255] postmaster LOG:  database system is shut down
"""


def test_one_crash_counts_once_though_the_postmaster_writes_three_lines_of_it():
    assert count_crash_recoveries(CRASH) == 1
    assert server_log_victims(CRASH) == [13284]


def test_an_excerpt_of_the_crash_counts_it_too():
    from lab.pgoutput import crash_excerpt
    assert count_crash_recoveries(crash_excerpt(CRASH)) == 1


def test_two_crashes_and_none():
    assert count_crash_recoveries(CRASH + CRASH.replace("13284", "13301")) == 2
    assert count_crash_recoveries(CLEAN) == 0 and count_crash_recoveries("") == 0
