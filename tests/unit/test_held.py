"""The pure decisions behind putting the DBA's settings back: whose value is in place
(databases/held.py), a PostgreSQL setting's server-wide value (postgresql/serverwide.py), and
whether a state file belongs to the live server (originals.other_server)."""
from __future__ import annotations

import pytest

from dbguard.databases.held import Live, taken_over, theirs
from dbguard.databases.postgresql.serverwide import Entry, Row, live_entry, server_wide, size_bytes
from dbguard.originals import other_server

MiB = 1024**2
AUTO = "/srv/pg/data/postgresql.auto.conf"
CONF = "/srv/pg/data/postgresql.conf"


# --- whose value is in place ------------------------------------------------------------------
@pytest.mark.parametrize("live, ours, expected", [
    (Live("2MB"), ["2MB"], False),                   # what dbguard set: restore the original
    (Live("4MB"), ["2MB", "4MB"], False),            # the value before a change in flight: still ours
    (Live("24MB"), ["2MB"], True),                   # ALTER SYSTEM by the DBA while shrunk: theirs
    (Live(None), ["2MB"], True),                     # ALTER SYSTEM RESET by the DBA: theirs
    (Live(None), ["2MB", None], False),              # no entry was the original: a restore writes the same
    (Live("8MB"), ["2MB", "8MB"], False),            # the DBA put the original back: restoring it is harmless
    (Live(None, known=False), ["2MB"], False),       # cannot see it: goes on as before, as ours
])
def test_theirs(live, ours, expected):
    assert theirs(live, ours) is expected


def test_taken_over_lists_only_settings_someone_else_changed():
    held = {"work_mem": ["2MB", "8MB"], "maintenance_work_mem": ["16MB", None], "temp_buffers": ["4MB"]}
    live = {"work_mem": Live("24MB"), "maintenance_work_mem": Live("16MB")}       # temp_buffers: no reading
    assert taken_over(held, live) == ["work_mem"]
    # MariaDB: sizes the server rounds compare within its unit.
    assert taken_over({"innodb_buffer_pool_size": [256 * MiB]}, {"innodb_buffer_pool_size": Live(257 * MiB)},
                      same=lambda a, b: abs(a - b) < 2 * MiB) == []


# --- PostgreSQL: the server-wide value --------------------------------------------------------
def row(source="configuration file", setting="8192", sourcefile=CONF, boot="4096", name="work_mem", unit="kB"):
    return Row(name=name, setting=setting, unit=unit, source=source, sourcefile=sourcefile, boot_val=boot)


@pytest.mark.parametrize("r, entries, expected", [
    # ALTER SYSTEM entry: its own text, put back by ALTER SYSTEM SET.
    (row(sourcefile=AUTO), [Entry("work_mem", "6MB", CONF), Entry("work_mem", "8MB", AUTO)],
     {"value": "8MB", "bytes": 8 * MiB, "auto_conf": True}),
    # An ALTER ROLE on dbguard's login hides it from the session; the file entry is the truth.
    (row(source="user", setting="1024", sourcefile=None), [Entry("work_mem", "8MB", AUTO)],
     {"value": "8MB", "bytes": 8 * MiB, "auto_conf": True}),
    # ... and the same when the value is in postgresql.conf: ALTER SYSTEM RESET puts it back.
    (row(source="database", setting="1024", sourcefile=None), [Entry("work_mem", "8192", CONF)],
     {"value": "8MB", "bytes": 8 * MiB, "auto_conf": False}),
    # In no file, hidden by a role setting: the built-in default.
    (row(source="user", setting="1024", sourcefile=None), [], {"value": "4MB", "bytes": 4 * MiB, "auto_conf": False}),
    # In no file, from the command line: what the session shows.
    (row(source="command line", setting="16384", sourcefile=None), [],
     {"value": "16MB", "bytes": 16 * MiB, "auto_conf": False}),
    # Without pg_file_settings: pg_settings' sourcefile tells the two files apart.
    (row(sourcefile=AUTO), None, {"value": "8MB", "bytes": 8 * MiB, "auto_conf": True}),
    (row(), None, {"value": "8MB", "bytes": 8 * MiB, "auto_conf": False}),
    (row(source="default", setting="4096", sourcefile=None), None,
     {"value": "4MB", "bytes": 4 * MiB, "auto_conf": False}),
])
def test_server_wide(r, entries, expected):
    assert server_wide(r, entries, "guard") == expected


@pytest.mark.parametrize("r, needle", [
    (row(source="user", setting="1024", sourcefile=None), "GRANT SELECT ON pg_file_settings TO guard"),
    (row(source="configuration file", sourcefile=None), "GRANT pg_read_all_settings TO guard"),
])
def test_server_wide_refuses_what_it_cannot_see(r, needle):
    why = server_wide(r, None, "guard")
    assert isinstance(why, str) and needle in why and "\n" not in why


@pytest.mark.parametrize("text, unit, nbytes", [
    ("64MB", "kB", 64 * MiB), ("65536", "kB", 64 * MiB), ("1.5GB", "kB", 1536 * MiB), (" 2 MB ", "kB", 2 * MiB),
    ("1024", "8kB", 8 * MiB), ("512B", "kB", 512), ("64mb", "kB", None), ("lots", "kB", None), ("64MB", None, None),
])
def test_size_bytes(text, unit, nbytes):
    assert size_bytes(text, unit) == nbytes


def test_live_entry():
    entries = [Entry("work_mem", "8MB", CONF), Entry("work_mem", "2MB", AUTO), Entry("work_mem", "3MB", AUTO)]
    assert live_entry(None, entries, "work_mem") == Live("3MB")
    assert live_entry(None, entries, "temp_buffers") == Live(None)
    # From pg_settings: the literal dbguard writes, so its own value compares equal.
    assert live_entry(row(setting="2048", sourcefile=AUTO), None, "work_mem") == Live("2MB")
    assert live_entry(row(), None, "work_mem") == Live(None)
    assert live_entry(row(source="user", sourcefile=None), None, "work_mem") == Live(None, known=False)


def hash_mult(source="default", setting="2", sourcefile=None):
    return row(name="hash_mem_multiplier", unit=None, source=source, setting=setting, sourcefile=sourcefile,
               boot="2")


@pytest.mark.parametrize("r, entries, expected", [
    # hash_mem_multiplier is a number, not a size: its ALTER SYSTEM text kept as written.
    (hash_mult(source="configuration file", setting="3", sourcefile=AUTO), [Entry("hash_mem_multiplier", "3.0", AUTO)],
     {"value": "3.0", "number": 3.0, "auto_conf": True}),
    (hash_mult(source="configuration file", setting="4", sourcefile=CONF), [Entry("hash_mem_multiplier", "4", CONF)],
     {"value": "4", "number": 4.0, "auto_conf": False}),
    (hash_mult(), [], {"value": "2", "number": 2.0, "auto_conf": False}),           # the built-in default
    (hash_mult(source="user", setting="8"), [], {"value": "2", "number": 2.0, "auto_conf": False}),
    (hash_mult(source="configuration file", setting="1.5", sourcefile=AUTO), None,
     {"value": "1.5", "number": 1.5, "auto_conf": True}),
])
def test_server_wide_of_a_multiplier(r, entries, expected):
    assert server_wide(r, entries, "guard") == expected
    assert "GRANT SELECT ON pg_file_settings" in server_wide(hash_mult(source="user"), None, "guard")
    assert live_entry(hash_mult(source="configuration file", setting="1", sourcefile=AUTO), None,
                      "hash_mem_multiplier") == Live("1")


# --- the state file's server ------------------------------------------------------------------
@pytest.mark.parametrize("saved, live, differs", [
    ({"system_identifier": "1", "data_directory": "/d"}, {"system_identifier": "1", "data_directory": "/d/"}, None),
    ({"system_identifier": "1", "data_directory": "/d"}, {"system_identifier": "2", "data_directory": "/d"},
     "system_identifier"),
    # a standby shares its primary's system_identifier
    ({"system_identifier": "1", "data_directory": "/a"}, {"system_identifier": "1", "data_directory": "/b"},
     "data_directory"),
    ({"system_identifier": "1", "data_directory": "/a"}, {"system_identifier": "1", "data_directory": ""}, None),
    (None, {"system_identifier": "1"}, None),             # a file from before identity was recorded
    ({"system_identifier": "1"}, None, None),             # not known yet: checked again once it is
])
def test_other_server(saved, live, differs):
    why = other_server(saved, live)
    assert (why is None) if differs is None else why.startswith(differs)


# --- one server listed twice --------------------------------------------------------------------
def test_same_server_twice():
    from dbguard.sensor import same_server_twice
    pg = {"system_identifier": "7", "data_directory": "/srv/main"}
    assert same_server_twice([("a", 10, None), ("b", 11, None)]) is None
    assert same_server_twice([("a", 10, None), ("b", 10, None)]).startswith(
        "databases: a and b reach the same server (server pid 10)")
    assert "system_identifier 7" in same_server_twice([("a", None, pg), ("b", None, dict(pg))])
    # a primary and its standby share the system_identifier, not the data directory
    assert same_server_twice([("a", None, pg), ("b", None, {**pg, "data_directory": "/srv/standby"})]) is None
    # a fact missing on both sides is no proof
    assert same_server_twice([("a", None, {**pg, "data_directory": ""}), ("b", None, {**pg, "data_directory": ""})]) \
        is None
    assert same_server_twice([("a", None, None), ("b", None, None)]) is None
