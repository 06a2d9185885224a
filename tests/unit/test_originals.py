"""State files: a schema checked on load; a damaged, hand-edited or planted file is moved
aside with one warning and protection goes on; writes never go through a link."""
from __future__ import annotations

import json
import logging
import os

import pytest

from dbguard.originals import Originals, schema_problem

PG = {"step": int, "saved_at": float, "settings": {str: {"value": str, "bytes": int, "auto_conf": bool}}}
GOOD = {"step": 1, "saved_at": 1.5, "settings": {"work_mem": {"value": "8MB", "bytes": 8388608, "auto_conf": False}}}


@pytest.mark.parametrize("value, why", [
    (GOOD, None),
    ({**GOOD, "saved_at": 2}, None),
    ({**GOOD, "step": -1}, "step: expected int >= 0, got -1"),
    ({**GOOD, "step": "1"}, "step: expected int >= 0, got '1'"),
    ({**GOOD, "step": True}, "step: expected int >= 0, got True"),
    ({"step": 1, "saved_at": 1.0}, "top level: missing settings"),
    ({**GOOD, "extra": 1}, "top level: unexpected key extra"),
    ({**GOOD, "settings": []}, "settings: expected an object"),
    ({**GOOD, "settings": {"work_mem": {"value": "8MB", "bytes": None, "auto_conf": False}}},
     "settings.work_mem.bytes: expected int >= 0, got None"),
    ([1, 2], "top level: expected an object"),
])
def test_schema(value, why):
    assert schema_problem(value, PG) == why


def test_optional_keys():
    schema = {"size": int, "caches?": {str: int}}
    assert schema_problem({"size": 1}, schema) is None
    assert schema_problem({"size": 1, "caches": {"a": 2}}, schema) is None
    assert schema_problem({"size": 1, "caches": {"a": "2"}}, schema) == "caches.a: expected int >= 0, got '2'"


def test_round_trip_and_clear(tmp_path):
    o = Originals(tmp_path / "state", "main", PG)
    assert o.load() is None
    o.save(GOOD)
    assert o.load() == GOOD
    assert os.stat(o.path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700
    assert sorted(os.listdir(tmp_path / "state")) == ["originals-main.json"], "no temp file left behind"
    o.clear()
    o.clear()
    assert o.load() is None


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", json.dumps({**GOOD, "step": "x"}).encode(),
                                     json.dumps([1]).encode(), b"[" * 100_000 + b"]" * 100_000, b""])
def test_a_damaged_file_is_moved_aside_with_one_warning(tmp_path, caplog, content):
    o = Originals(tmp_path, "main", PG, fix="check work_mem by hand")
    o.path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="dbguard"):
        assert o.load() is None
        assert o.load() is None          # gone now: no second warning
    warnings = [r.getMessage() for r in caplog.records]
    aside = [p for p in os.listdir(tmp_path) if p.startswith("originals-main.json.damaged-")]
    assert len(warnings) == 1 and len(aside) == 1, (warnings, aside)
    assert "damaged state file" in warnings[0] and aside[0] in warnings[0] and "check work_mem by hand" in warnings[0]
    assert "\n" not in warnings[0]
    assert (tmp_path / aside[0]).read_bytes() == content, "kept for the DBA as it was"
    assert not o.path.exists()
    o.save(GOOD)                          # protection goes on: the next change is saved afresh
    assert o.load() == GOOD


def test_a_planted_link_is_moved_aside_and_its_target_untouched(tmp_path, caplog):
    victim = tmp_path / "victim"
    victim.write_text(json.dumps(GOOD))
    o = Originals(tmp_path / "state", "main", PG)
    (tmp_path / "state").mkdir(mode=0o700)
    o.path.symlink_to(victim)
    with caplog.at_level(logging.WARNING, logger="dbguard"):
        assert o.load() is None, "a link is never read through"
    assert "a symbolic link" in caplog.text
    aside = [p for p in os.listdir(tmp_path / "state") if ".damaged-" in p]
    assert len(aside) == 1 and os.path.islink(tmp_path / "state" / aside[0])
    o.path.symlink_to(victim)             # planted again, just before a save
    o.save({**GOOD, "step": 2})
    assert not o.path.is_symlink() and o.load()["step"] == 2
    assert json.loads(victim.read_text()) == GOOD, "the save replaced the link, not the file it points to"


def test_a_file_of_another_server_is_moved_aside_once_and_never_returned(tmp_path, caplog):
    here = {"system_identifier": "111", "data_directory": "/srv/a"}
    o = Originals(tmp_path, "main", PG, server=lambda: here)
    o.save(GOOD)
    assert json.loads(o.path.read_text())["identity"] == here, "the identity is recorded with the originals"
    assert o.load() == {**GOOD, "identity": here}
    here = {"system_identifier": "222", "data_directory": "/srv/a"}     # the name now leads to another cluster
    with caplog.at_level(logging.WARNING, logger="dbguard"):
        assert o.load() is None
        assert o.load() is None
    warnings = [r.getMessage() for r in caplog.records]
    aside = [p for p in os.listdir(tmp_path) if p.startswith("originals-main.json.other-server-")]
    assert len(warnings) == 1 and len(aside) == 1, (warnings, aside)
    assert "another server" in warnings[0] and "111" in warnings[0] and "222" in warnings[0] and aside[0] in warnings[0]
    assert not o.path.exists()


def test_save_keeps_the_recorded_server_while_the_live_one_is_unknown(tmp_path):
    known = {"system_identifier": "111"}
    o = Originals(tmp_path, "main", PG, server=lambda: None)
    o.save({**GOOD, "identity": known})
    assert o.load()["identity"] == known
