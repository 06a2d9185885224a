"""dbguard.databases.postgresql.stats: rows recorded from a real PostgreSQL 15 -> DbStats.

The rows and the oracle (the same facts asked of the server another way) come from
tests/fixtures/databases/capture.py; the expected values here are the oracle's.
"""
from __future__ import annotations

import json
import sys
import subprocess
from pathlib import Path

from dbguard.databases.postgresql.stats import (Reading, down_stats, role_of, setting_bytes, shrunk, shrunk_literal,
                                                size_literal, steps_max, to_stats, unit_bytes)
from dbguard.model import Role

MiB = 1024**2
FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures/databases/postgresql-15.json").read_text())
ORACLE = FIXTURE["oracle"]
SHRINK = ("work_mem", "maintenance_work_mem")


def reading(**over) -> Reading:
    r = FIXTURE["reading"]
    return Reading(**{"activity": r["activity"], "settings": r["settings"], "hit_ratio": r["hit_ratio"],
                      "block_size": ORACLE["block_size"], **over})


def stats(saved=None, **over):
    kw = dict(server_pid=4242, data_directory="/srv/pg", shrink_settings=SHRINK, saved=saved, floor=2 * MiB,
              steps=5, memory_of=lambda pid: 1000 + pid, notes={})
    kw.update(over)
    return to_stats("main", reading(), **kw)


def test_roles_counts_and_sessions_match_the_server():
    s = stats()
    assert s.up and s.kind == "postgresql" and s.name == "main"
    assert s.extra["backends"] == ORACLE["backend_type_counts"]
    activity = FIXTURE["reading"]["activity"]
    assert set(s.roles) == {row[0] for row in activity} | {4242} and s.roles[4242] is Role.POSTMASTER
    by_type = {row[0]: row[1] for row in activity}
    for pid, backend_type in by_type.items():
        expected = Role.PG_BACKEND if backend_type == "client backend" else Role.PG_AUXILIARY
        assert s.roles[pid] is expected, (pid, backend_type)
    # The sessions are the client backends the capture opened; its own connection is none of them.
    sessions = {x.pid: x for x in s.sessions}
    assert set(sessions) == {int(p) for p in ORACLE["sessions"]}
    assert ORACLE["own_pid"] not in sessions and s.roles[ORACLE["own_pid"]] is Role.PG_BACKEND
    for pid, want in ORACLE["sessions"].items():
        got = sessions[int(pid)]
        assert (got.state, got.query, got.user, got.kind) == (want["state"], want["query"], ORACLE["user"],
                                                              "client backend")
        assert got.age_seconds >= 1.0              # the capture waited a second after opening them
        assert got.memory_bytes == 1000 + int(pid)  # from memory_of, for sessions only
        assert got.client


def test_cache_settings_and_steps():
    s = stats()
    assert s.cache_bytes == s.cache_configured_bytes == ORACLE["shared_buffers_bytes"]
    assert s.extra["settings"] == {"work_mem": "8MB", "maintenance_work_mem": "64MB"}   # as the capture set them
    assert {n: setting_bytes(*FIXTURE["reading"]["settings"][n][:2]) for n in SHRINK} == ORACLE["settings_bytes"]
    # 8 MiB -> 2 MiB floor takes 2 halvings, 64 MiB takes 5: the deeper one, capped at shrink_steps.
    assert s.shrink_steps_max == 5 and s.shrink_step == 0
    assert stats(steps=3).shrink_steps_max == 3 and stats(floor=64 * MiB).shrink_steps_max == 0
    assert s.hit_ratio == FIXTURE["reading"]["hit_ratio"] and 0 < s.hit_ratio <= 1
    assert s.cache_used_bytes == 0 and "cache_used" not in s.extra


def test_while_shrunk_the_steps_count_from_the_saved_originals():
    saved = {"step": 2, "saved_at": 0.0,
             "settings": {"work_mem": {"value": "32MB", "bytes": 32 * MiB, "auto_conf": False},
                          "maintenance_work_mem": {"value": "1GB", "bytes": 1024 * MiB, "auto_conf": True}}}
    s = stats(saved=saved, steps=16)
    assert s.shrink_step == 2 and s.shrink_steps_max == 9          # 1 GiB / 2**9 = 2 MiB
    assert s.extra["settings"] == {"work_mem": "8MB", "maintenance_work_mem": "64MB"}   # what the server runs now


def test_only_client_backends_are_client_sessions():
    rows = [[10, "autovacuum worker", "active", "", "autovacuum: VACUUM t", 3.0, False],
            [11, "walsender", "active", "rep", "", 9.0, False],
            [12, "client backend", "active", "app", "SELECT 1", 1.0, False]]
    s = to_stats("main", reading(activity=rows), server_pid=None, data_directory="", shrink_settings=SHRINK,
                 saved=None, floor=MiB, steps=3, memory_of=lambda pid: 0, notes={})
    assert {x.pid: x.client for x in s.sessions} == {10: False, 11: False, 12: True}


def test_buffercache_and_notes():
    s = to_stats("main", reading(used_buffers=100), server_pid=None, data_directory="", shrink_settings=SHRINK,
                 saved=None, floor=MiB, steps=3, memory_of=lambda pid: 0, notes={"state_error": "bad file"})
    assert s.cache_used_bytes == 100 * ORACLE["block_size"] and s.extra["state_error"] == "bad file"
    assert Role.POSTMASTER not in s.roles.values()


def test_down_keeps_the_postmaster_role():
    d = down_stats("main", "connection refused", 4242, "/srv/pg", 3)
    assert not d.up and d.roles == {4242: Role.POSTMASTER} and d.shrink_step == 3 and d.error == "connection refused"
    assert down_stats("main", "x", None, "", 0).roles == {}


def test_units_and_literals():
    assert unit_bytes("8kB") == 8192 and unit_bytes("kB") == 1024 and unit_bytes("ms") is None
    assert setting_bytes("16384", "8kB") == 128 * MiB and setting_bytes("-1", "kB") is None
    assert size_literal(4 * MiB) == "4MB" and size_literal(1536 * 1024) == "1536kB"
    assert steps_max({"a": 8 * MiB, "b": 64 * MiB}, 2 * MiB, 3) == 3 and steps_max({"a": MiB}, 2 * MiB, 3) == 0
    assert steps_max({}, MiB, 3) == 0
    assert role_of("some future worker") is Role.PG_AUXILIARY     # shield what we do not know


def test_pure_modules_load_without_the_drivers():
    code = ("import sys\n"
            "import dbguard.databases.postgresql.stats, dbguard.databases.mysql.stats, dbguard.databases.steps\n"
            "print(sorted(m for m in ('psycopg', 'pymysql') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]", out


def test_temporary_files_are_read_for_active_sessions_only():
    asked = []
    s = stats(temp_of=lambda pid: asked.append(pid) or 5 * MiB)
    for x in s.sessions:
        assert x.temp_bytes == (5 * MiB if x.state == "active" else 0), x
        assert x.held_bytes == x.memory_bytes + x.temp_bytes
    assert sorted(asked) == sorted(x.pid for x in s.sessions if x.state == "active")


def test_a_parallel_querys_workers_count_in_their_leaders_session():
    # pg_stat_activity as PostgreSQL 15 shows a parallel sort: the leader (leader_pid is its own
    # pid while it leads) and two workers naming it; a third session runs alone (leader_pid NULL).
    activity = [
        [100, "client backend", "active", "app", "SELECT ... ORDER BY", 4.0, False, 100, 1764558000.25],
        [101, "parallel worker", "active", "app", "SELECT ... ORDER BY", 4.0, False, 100],
        [102, "parallel worker", "active", "app", "SELECT ... ORDER BY", 4.0, False, 100],
        [200, "client backend", "active", "app", "SELECT 1", 1.0, False, None],
        [300, "checkpointer", None, None, "", 9.0, False, None],
    ]
    memory = {100: 50 * MiB, 101: 40 * MiB, 102: 45 * MiB, 200: 3 * MiB}
    temp = {100: 1 * MiB, 101: 7 * MiB, 102: 0, 200: 0}
    s = to_stats("main", reading(activity=activity), server_pid=4242, data_directory="/srv/pg", shrink_settings=SHRINK,
                 saved=None, floor=2 * MiB, steps=5, memory_of=memory.get, temp_of=temp.get, notes={})
    by_pid = {x.pid: x for x in s.sessions}
    assert (by_pid[100].memory_bytes, by_pid[100].temp_bytes) == (135 * MiB, 8 * MiB)
    assert (by_pid[200].memory_bytes, by_pid[200].temp_bytes) == (3 * MiB, 0)
    assert by_pid[100].started == 1764558000.25 and by_pid[200].started is None
    # The workers are no client's session of their own: never ended apart from their leader.
    assert not by_pid[101].client and not by_pid[102].client and by_pid[100].client
    assert s.roles[101] is Role.PG_BACKEND and s.roles[300] is Role.PG_AUXILIARY


def test_hash_mem_multiplier_is_halved_toward_1_never_below():
    # A number, not a size: 2 -> 1 in one step, 8 -> 4 -> 2 -> 1 in three; never below the
    # server's minimum 1, never above the DBA's value. Sizes keep their own floor.
    assert [shrunk("hash_mem_multiplier", 8.0, MiB, s) for s in range(5)] == [8.0, 4.0, 2.0, 1.0, 1.0]
    assert shrunk("hash_mem_multiplier", 1.5, MiB, 1) == 1.0 and shrunk("hash_mem_multiplier", 0.5, MiB, 1) == 0.5
    assert shrunk_literal("hash_mem_multiplier", 3.0, MiB, 1) == "1.5"
    assert shrunk_literal("work_mem", 8 * MiB, 2 * MiB, 1) == "4MB"
    assert steps_max({"hash_mem_multiplier": 8.0}, MiB, 16) == 3 and steps_max({"hash_mem_multiplier": 1.0}, MiB, 3) == 0
    assert steps_max({"work_mem": 4 * MiB, "hash_mem_multiplier": 2.0}, MiB, 16) == 2
    saved = {"step": 1, "saved_at": 0.0,
             "settings": {"hash_mem_multiplier": {"value": "2", "number": 2.0, "auto_conf": False}}}
    s = to_stats("main", reading(settings={"hash_mem_multiplier": ["1", None, "/d/postgresql.auto.conf"]}),
                 server_pid=4242, data_directory="/srv/pg", shrink_settings=("hash_mem_multiplier",), saved=saved,
                 floor=2 * MiB, steps=16, memory_of=lambda pid: 0, notes={})
    assert s.shrink_step == 1 and s.shrink_steps_max == 1 and s.extra["settings"] == {"hash_mem_multiplier": "1"}
