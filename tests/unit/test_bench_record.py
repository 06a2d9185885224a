"""benchmarks.record: the run loop and command line the standalone benchmarks share (pure: the
measuring is a stand-in here; the benchmarks themselves run against real servers)."""
from __future__ import annotations

import json

import pytest

from benchmarks.record import Standalone, repeat
from dbguard.errors import DbguardError


def test_repeat_interleaves_the_ways_run_after_run(capsys):
    seen = []
    out = repeat(2, ("none", "dbguard"), lambda w: seen.append(w) or {"way": w, "n": len(seen)}, lambda r: str(r["n"]))
    assert seen == ["none", "dbguard", "none", "dbguard"]
    assert [r["n"] for r in out] == [1, 2, 3, 4]
    assert capsys.readouterr().out.splitlines() == ["run 1/2 none: 1", "run 1/2 dbguard: 2", "run 2/2 none: 3",
                                                    "run 2/2 dbguard: 4"]


def record(tmp_path) -> Standalone:
    home = tmp_path / "benchmarks"
    home.mkdir(exist_ok=True)
    (home / "x.json").write_text('{"recorded": true}')
    return Standalone("x", "X", home / "x.json", home / "X.md", lambda d: [f"{d['runs']} runs: {d['results']}"])


def test_out_leaves_the_recorded_runs_alone(tmp_path, capsys):
    r = record(tmp_path)
    assert r.main(["--runs", "1", "--out", str(tmp_path / "smoke")], "doc", lambda: None,
                  lambda a: repeat(a.runs, ("a",), lambda w: {"w": w}, str)) == 0
    assert json.loads(r.json_path.read_text()) == {"recorded": True}
    smoke = json.loads((tmp_path / "smoke" / "x.json").read_text())
    assert smoke["runs"] == 1 and smoke["results"] == [{"w": "a"}]
    assert smoke["command"] == "python -m benchmarks.x --runs 1 --out " + str(tmp_path / "smoke")
    assert (tmp_path / "smoke" / "X.md").read_text().startswith("# Benchmark: X")


def test_what_is_missing_is_one_line_and_exit_2(tmp_path, capsys):
    def need():
        raise DbguardError("redis-server not installed: apt-get install redis-server")
    assert record(tmp_path).main([], "doc", need, lambda a: pytest.fail("measured without what it needs")) == 2
    assert capsys.readouterr().err == "benchmarks.x: redis-server not installed: apt-get install redis-server\n"
    with pytest.raises(SystemExit):
        record(tmp_path).main(
            ["--runs", "0"], "doc", lambda: None, lambda a: pytest.fail("measured 0 runs"))
    assert "--runs 0: give 1 or more" in capsys.readouterr().err


def test_grouped_keeps_the_ways_order_and_leaves_out_a_way_without_runs():
    from benchmarks.record import grouped
    runs = [{"c": "dbguard", "n": 1}, {"c": "none", "n": 2}, {"c": "dbguard", "n": 3}]
    assert grouped(runs, "c", ("none", "earlyoom", "dbguard")) == [
        ("none", [{"c": "none", "n": 2}]), ("dbguard", [{"c": "dbguard", "n": 1}, {"c": "dbguard", "n": 3}])]
