"""benchmarks/rss.py: the daemon's RSS by mapping, from smaps text, and the lines RESULTS.md shows of it."""
from __future__ import annotations

from benchmarks.rss import MAPPING_GROUPS, TARGET_MIB, by_mapping, made_of_lines

HEAP, EXE, PG, LIBC, DYNLOAD, OTHER = (label for label, _ in MAPPING_GROUPS)


def _mapping(header: str, rss_kib: int) -> str:
    return f"{header}\nSize:               4096 kB\nRss:             {rss_kib:>5} kB\nPss:                  1 kB\n"


SMAPS = "".join([
    _mapping("00400000-00420000 r--p 00000000 08:01 123   /usr/bin/python3.11", 1024),
    _mapping("00420000-00700000 r-xp 00020000 08:01 123   /usr/bin/python3.11", 2048),
    _mapping("0e9be000-0ef63000 rw-p 00000000 00:00 0     [heap]", 3072),
    _mapping("7f3705591000-7f3705791000 rw-p 00000000 00:00 0 ", 512),
    _mapping("7f3705800000-7f3705900000 r-xp 00000000 08:01 9  /v/site-packages/psycopg_binary.libs/libpq-7f06c4f5.so.5.15", 256),
    _mapping("7f3705900000-7f3705a00000 r-xp 00000000 08:01 9  /v/site-packages/psycopg_binary/pq.cpython-311-x86_64-linux-gnu.so", 256),
    _mapping("7f3705a00000-7f3705b00000 r-xp 00000000 08:01 9  /usr/lib/x86_64-linux-gnu/libc.so.6", 1536),
    _mapping("7f3705b00000-7f3705c00000 r-xp 00000000 08:01 9  /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 512),
    _mapping("7f3705c00000-7f3705d00000 r-xp 00000000 08:01 9  /usr/lib/python3.11/lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so", 128),
    _mapping("7f3705d00000-7f3705e00000 r--p 00000000 08:01 9  /usr/lib/locale/C.utf8/LC_CTYPE", 64),
    _mapping("7ffd1000-7ffd2000 rw-p 00000000 00:00 0     [stack]", 64),
])


def test_by_mapping_sums_each_group():
    got = by_mapping(SMAPS)
    assert got == {HEAP: 3.5, EXE: 3.0, PG: 0.5, LIBC: 2.0, DYNLOAD: 0.125, OTHER: 0.125}


def _cost(at_rest: float, crowded: float) -> dict:
    def run(extra: int, heap: float) -> dict:
        return {"extra_processes": extra, "rss_by_mapping_mib": {**dict.fromkeys((EXE, PG, LIBC, DYNLOAD, OTHER), 2.0),
                                                                 HEAP: heap}}
    return {"dbguard-user": {"runs": [run(0, at_rest - 10), run(5000, crowded - 10), {"error": "x", "extra_processes": 0}]},
            "imports": [{"step": "python alone", "rss_mib": 10.0, "anon_mib": 4.0},
                        {"step": "+ dbguard's daemon and command line", "rss_mib": 17.0, "anon_mib": 11.0},
                        {"step": "+ psycopg, tenacity and dbguard's PostgreSQL modules", "rss_mib": 26.5,
                         "anon_mib": 17.0}]}


def test_the_tables_and_the_verdict_come_from_the_runs():
    text = "\n".join(made_of_lines(_cost(29.0, 33.5)))
    assert "| total (RSS steady) | 29.0 MiB | 33.5 MiB |" in text
    assert f"| {HEAP} | 19.0 MiB | 23.5 MiB |" in text
    assert "| + psycopg, tenacity and dbguard's PostgreSQL modules | 26.5 MiB | 17.0 MiB | +9.5 MiB |" in text
    assert f"at most {TARGET_MIB} MiB" in text and "33.5 MiB here, which misses by 3.5 MiB" in text
    assert "PostgreSQL modules +9.5 MiB, 2.0 MiB of it libpq" in text and "standard library they use +7.0" in text
    assert "4.5 MiB is what 5,000 more processes add" in text and "The 29.0 MiB at rest" in text
    assert "is 26.5 MiB" in text and "alone (its executable" in text and "is 10.0 MiB" in text


def test_a_met_target_is_said_so():
    assert "29.5 MiB here, which meets it" in "\n".join(made_of_lines(_cost(28.0, 29.5)))


def test_without_runs_by_mapping_only_the_import_steps_are_shown():
    cost = _cost(29.0, 33.5)
    cost["dbguard-user"]["runs"] = [{"extra_processes": 0, "rss_steady_mib": 34.0},     # recorded before mappings
                                    {"extra_processes": 5000, "rss_by_mapping_mib": None}]      # smaps gone
    text = "\n".join(made_of_lines(cost))
    assert "by mapping" not in text and "IMPORT_STEPS" in text and "Issue #17" not in text


def test_the_debs_psycopg_is_said_against_the_psycopg_step():
    cost = _cost(29.0, 33.5)
    assert "The .deb's psycopg" not in "\n".join(made_of_lines(cost))
    cost["imports_deb"] = {"rss_mib": 29.75, "anon_mib": 18.5}
    text = "\n".join(made_of_lines(cost))
    assert "up to psycopg's step are 29.8 MiB (18.5 MiB anonymous), +3.2 MiB against 26.5 MiB" in text
    cost["imports_deb"] = {"error": "ImportError: no pq wrapper available"}
    assert "The .deb's psycopg" not in "\n".join(made_of_lines(cost))


def test_asyncio_left_out_is_said_against_the_psycopg_step():
    cost = _cost(29.0, 33.5)
    assert "asyncio, which psycopg and tenacity import" not in "\n".join(made_of_lines(cost))
    cost["imports_asyncio"] = {"rss_mib": 27.9, "anon_mib": 18.25}
    text = "\n".join(made_of_lines(cost))
    assert "imports_asyncio), the same imports up to psycopg's step are 27.9 MiB (18.2 MiB anonymous), +1.4 MiB against " \
           "26.5 MiB" in text
    cost["imports_asyncio"] = {"error": "RuntimeError: x"}
    assert "asyncio, which psycopg and tenacity import" not in "\n".join(made_of_lines(cost))


def test_an_imports_step_that_failed_as_a_whole_shows_no_steps():
    cost = _cost(29.0, 33.5)
    cost["imports"] = {"error": "CalledProcessError: ..."}
    assert "IMPORT_STEPS" not in "\n".join(made_of_lines(cost))
