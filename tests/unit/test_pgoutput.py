"""The server log's crashes, counted from PostgreSQL 15's lines: a backend the kernel OOM-killed
(the postmaster's three lines of it as a CI run's log had them on 2026-12-03, with the recovery
that follows), an excerpt of a crash whose recovery crashed too (2026-11-28), and a clean start
and fast shutdown."""
from __future__ import annotations

from lab.pgoutput import count_crash_recoveries, crash_excerpt, server_log_victims

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
# A backend's crash and then its recovery's (2026-11-28), excerpted: without "terminating any
# other active server processes", which crash_excerpt leaves out too.
SERVER_LOG_CRASH = """\
2026-11-28 05:10:14.402 UTC [11831] LOG:  server process (PID 11846) was terminated by signal 9: Killed
2026-11-28 05:10:14.464 UTC [11831] LOG:  all server processes terminated; reinitializing
2026-11-28 05:10:14.636 UTC [11861] LOG:  database system was not properly shut down; automatic recovery in progress
2026-11-28 05:10:15.536 UTC [11831] LOG:  startup process (PID 11861) was terminated by signal 9: Killed
2026-11-28 05:10:15.537 UTC [11831] LOG:  shutting down due to startup process failure
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
    assert count_crash_recoveries(crash_excerpt(CRASH)) == 1


def test_two_crashes_and_none():
    assert count_crash_recoveries(CRASH + CRASH.replace("13284", "13301")) == 2
    assert count_crash_recoveries(CLEAN) == 0 and count_crash_recoveries("") == 0


def test_crash_recovery_and_victims_from_server_log():
    # Two crashes: a backend's (restarted from) and the startup process's in that recovery (shut down on).
    assert count_crash_recoveries(SERVER_LOG_CRASH) == 2
    assert server_log_victims(SERVER_LOG_CRASH) == [11846, 11861]
    assert count_crash_recoveries("LOG:  database system is ready to accept connections\n") == 0
