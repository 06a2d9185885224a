"""dbguard.databases.mysql: rows recorded from a real MariaDB 10.11 -> facts and DbStats.

The rows and the oracle (the same facts asked of the server another way, and the sessions the
capture opened) come from tests/fixtures/databases/capture.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from dbguard.databases.mysql.facts import server_facts
from dbguard.databases.mysql.grants import Grants, missing_grants
from dbguard.databases.mysql.stats import Pool, Reading, pending_bytes, resize_running, sessions_from, to_stats
from dbguard.model import Role

MiB = 1024**2
FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures/databases/mariadb-10.11.json").read_text())
ORACLE = FIXTURE["oracle"]
R = FIXTURE["reading"]


def reading() -> Reading:
    return Reading(variables=R["variables"], status=R["status"], processlist=R["processlist"], own_id=R["own_id"],
                   memory_by_connection={int(k): v for k, v in R["memory_by_connection"].items()},
                   memory_global_total=R["memory_global_total"])


def facts():
    return server_facts(FIXTURE["facts"]["variables"], FIXTURE["facts"]["grants"], peer=None)


def pool(**over) -> Pool:
    kw = dict(size=ORACLE["pool_bytes"], configured=ORACLE["pool_bytes"], floor=32 * MiB, steps=3)
    kw.update(over)
    return Pool(**kw)


def test_server_facts():
    f = facts()
    assert f.mariadb and f.version == ORACLE["version"]
    assert f.session_resize and f.unit == MiB          # 10.11.19 has innodb_buffer_pool_size_max: 1 MiB units
    assert f.page_size == ORACLE["page_size"]
    assert missing_grants(f.grants, f.mariadb) == []     # the capture granted PROCESS, SUPER, CONNECTION ADMIN


def test_stats_from_recorded_rows():
    s = to_stats("orders", reading(), facts(), pool(), server_pid=4242, server_rss=500 * MiB,
                 shrink_caches=("table_open_cache",), notes={})
    assert s.up and s.kind == "mysql" and s.roles == {4242: Role.MYSQLD}
    assert s.data_directory == R["variables"]["datadir"]
    assert s.cache_bytes == s.cache_configured_bytes == ORACLE["pool_bytes"] == 160 * MiB
    assert s.cache_used_bytes == ORACLE["pages_data"] * ORACLE["page_size"]
    assert 0 < s.hit_ratio <= 1
    assert s.shrink_step == 0 and s.shrink_steps_max == 3 and s.grow_bytes == 0
    assert not s.resize_in_progress and s.self_shrunk_ago is None
    assert s.extra["caches"] == {"table_open_cache": int(R["variables"]["table_open_cache"])}
    assert s.extra["memory_global_total"] == R["memory_global_total"] and s.extra["server_rss_bytes"] == 500 * MiB
    # The sessions are exactly the two the capture opened as `app`: not its own connection, not
    # the event scheduler.
    sessions = {x.pid: x for x in s.sessions}
    assert set(sessions) == {int(k) for k in ORACLE["sessions"]}
    for cid, want in ORACLE["sessions"].items():
        got = sessions[int(cid)]
        assert (got.kind, got.user, got.state) == ("connection", want["user"], want["state"])
        assert got.memory_bytes >= want.get("memory_at_least", 0)
        assert got.query == want.get("query", "") and got.age_seconds >= 1.0


def test_a_shrunk_pool_reports_its_step_and_what_growing_adds():
    # 160 MiB configured, 32 MiB floor, 3 steps: 160 -> 118 -> 75 -> 32 MiB.
    s = to_stats("orders", reading(), facts(), pool(size=75 * MiB, resize_in_progress=True, self_shrunk_ago=12.5),
                 server_pid=None, server_rss=None, shrink_caches=(), notes={"state_error": "x"})
    assert s.shrink_step == 2 and s.grow_bytes == (118 - 75) * MiB
    assert s.resize_in_progress and s.self_shrunk_ago == 12.5 and s.roles == {} and s.extra["state_error"] == "x"


def test_session_memory_falls_back_to_processlist_and_is_never_negative():
    rows = [[7, "app", "Sleep", 3, "", None, 2048], [8, "app", "Query", 1, "x", "SELECT 1", None],
            [9, "system user", "Daemon", 0, "", None, 0], [10, "rep", "Binlog Dump", 0, "", None, 0]]
    got = {x.pid: x for x in sessions_from(rows, own_id=99, memory_by_connection={8: -16})}
    assert set(got) == {7, 8}
    assert got[7].memory_bytes == 2048 and got[8].memory_bytes == 0
    assert (got[7].state, got[8].state) == ("idle", "active")
    # The recorded event scheduler thread counted -16 bytes in performance_schema.
    assert R["memory_by_connection"]["1"] < 0


def test_resize_status_of_every_flavour():
    for recorded in FIXTURE["resize_status"].values():        # MariaDB 10.11.19: resizes in the session
        assert not resize_running(recorded), recorded
    # Texts the servers write (storage/innobase/buf/buf0buf.cc) and MySQL >= 8.0.31's code.
    assert resize_running({"Innodb_buffer_pool_resize_status": "Resizing also other hash tables."})
    assert resize_running({"Innodb_buffer_pool_resize_status": "Withdrawing blocks to be shrunken."})
    assert not resize_running({"Innodb_buffer_pool_resize_status": "Completed resizing buffer pool at 220826 6:57:46."})
    assert not resize_running({"Innodb_buffer_pool_resize_status": "Completed resizing buffer pool."})
    assert not resize_running({"Innodb_buffer_pool_resize_status":
                               "Size did not change (old size = new size = 268435456. Nothing to do."})
    assert not resize_running({"Innodb_buffer_pool_resize_status_code": "0",
                               "Innodb_buffer_pool_resize_status": "Resizing also other hash tables."})
    assert resize_running({"Innodb_buffer_pool_resize_status_code": "2", "Innodb_buffer_pool_resize_status": ""})
    assert not resize_running({"Innodb_buffer_pool_resize_status_code": "7",      # BUF_POOL_RESIZE_FAILED
                               "Innodb_buffer_pool_resize_status": "Resizing failed"})


def test_grants_parse_mariadb_and_mysql_forms():
    g = Grants.parse(FIXTURE["facts"]["grants"])                # recorded, IDENTIFIED BY PASSWORD form
    assert {"PROCESS", "SUPER", "CONNECTION ADMIN"} <= g.privileges
    g = Grants.parse(["GRANT PROCESS ON *.* TO `dbguard`@`localhost`"])
    assert missing_grants(g, mariadb=True) == ["resize the buffer pool: SUPER",
                                               "kill other users' statements: CONNECTION ADMIN or SUPER"]
    g = Grants.parse(["GRANT PROCESS ON *.* TO `dbguard`@`%`", "GRANT CONNECTION_ADMIN ON *.* TO `dbguard`@`%`"])
    assert missing_grants(g, mariadb=False) == ["resize the buffer pool: SYSTEM_VARIABLES_ADMIN or SUPER"]
    assert missing_grants(Grants.parse(["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost`"]), False) == []


def test_the_servers_temporary_files_are_divided_among_the_running_statements_by_how_long_they_ran():
    # PROCESSLIST as MariaDB 10.11 showed the sessions scenario: filesorts ("Creating sort
    # index", "Sorting result"), one merging its runs (its state is no sort's), one copying to an
    # on-disk temporary table, one killed and still unwinding, a plain read just begun, one idle
    # connection and dbguard's own. mysqld held 500 MiB of files open in tmpdir; the statements
    # that ran a second or more ran 20 s together.
    rows = [[21, "app", "Query", 4.0, "Creating sort index", "SELECT ... ORDER BY", 0],
            [22, "app", "Query", 4.0, "Sorting result", "SELECT ... ORDER BY", 0],
            [23, "app", "Query", 4.0, "Sending data", "SELECT ... ORDER BY", 0],
            [24, "app", "Query", 2.0, "Copying to tmp table on disk", "SELECT ... GROUP BY", 0],
            [27, "app", "Killed", 6.0, "Creating sort index", "SELECT ... ORDER BY", 0],
            [25, "app", "Query", 0.1, "Sending data", "SELECT 1", 0],
            [26, "app", "Sleep", 9.0, "", None, 0],
            [99, "dbguard", "Query", 30.0, "Filling schema table", "SELECT ...", 0]]
    got = {x.pid: x for x in sessions_from(rows, own_id=99, memory_by_connection={}, temp_bytes=500 * MiB)}
    assert [got[p].temp_bytes for p in (21, 22, 23, 24)] == [100 * MiB] * 3 + [50 * MiB]
    assert got[25].temp_bytes == got[26].temp_bytes == 0 and 27 not in got and 99 not in got
    # Only short reads running: the files are nobody's they could be (measured: two reads were
    # cancelled for 213 MiB of files of sorts killed a moment before).
    assert all(s.temp_bytes == 0 for s in sessions_from(rows[5:], own_id=99, memory_by_connection={},
                                                       temp_bytes=500 * MiB))


def test_mariadb_rows_carry_the_statements_start():
    rows = [[31, "app", "Query", 2.5, "Creating sort index", "SELECT ...", 0, 1764558000.125],
            [32, "app", "Sleep", 9.0, "", None, 0, None]]
    got = {x.pid: x for x in sessions_from(rows, own_id=99, memory_by_connection={})}
    assert got[31].started == 1764558000.125 and got[32].started is None
    # MySQL rows have neither MEMORY_USED nor a start.
    assert sessions_from([[33, "app", "Query", 2, "x", "SELECT 1"]], own_id=99, memory_by_connection={})[0].started is None


def test_what_the_running_statements_allocated_and_have_not_touched_is_a_lower_bound():
    # A dozen filesorts each asked for a 160 MiB sort buffer (MEMORY_USED counts it at once);
    # mysqld's anonymous RSS is 400 MiB: at most that much of it is resident, so at least
    # 12 x 160 - 400 = 1520 MiB is still to be charged. Idle sessions, server threads and
    # dbguard's own are no statement's.
    rows = [[20 + i, "app", "Query", 0.5, "Creating sort index", "SELECT ... ORDER BY", 160 * MiB] for i in range(12)]
    rows += [[40, "app", "Sleep", 9.0, "", None, 300 * MiB], [41, "system user", "Daemon", 0, "", None, 900 * MiB],
             [42, "rep", "Binlog Dump", 0, "", None, 900 * MiB], [99, "dbguard", "Query", 0, "", "SELECT", 900 * MiB]]
    sessions = sessions_from(rows, own_id=99, memory_by_connection={})
    assert pending_bytes(sessions, server_anon=400 * MiB) == 1520 * MiB
    assert pending_bytes(sessions, server_anon=4000 * MiB) == 0        # all of it may be resident already
    assert pending_bytes(sessions, server_anon=None) == 0              # no RSS, no claim
    s = to_stats("orders", Reading(variables=R["variables"], status=R["status"], processlist=rows, own_id=99),
                 facts(), pool(), server_pid=None, server_rss=None, shrink_caches=(), notes={},
                 server_anon=400 * MiB)
    assert s.pending_bytes == 1520 * MiB
