"""Config loading: good files load, every bad value is one line naming its key, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard import config, units
from dbguard.settings import Audit, Bpf, General, Kill, Metrics, Pressure, Protection
from dbguard.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads_and_documents_every_key():
    cfg = config.load(ROOT / "config.example.toml")
    assert cfg.databases[0].kind == "postgresql"
    text = (ROOT / "config.example.toml").read_text()
    import dataclasses
    for section in ("general", "pressure", "kill", "protection", "bpf", "audit", "metrics"):
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"{f.name} =" in text, f"config.example.toml does not document {section}.{f.name}"
    for f in dataclasses.fields(config.DatabaseConfig):
        if f.name not in ("name",):
            assert f.name in text, f"config.example.toml does not document databases.{f.name}"
    for table, cls in (("caches", config.CacheConfig), ("poolers", config.PoolerConfig)):
        body = text.split(f"# [[{table}]]\n")[1]
        for f in dataclasses.fields(cls):
            assert f"{f.name} =" in body, f"config.example.toml does not document {table}.{f.name}"
    for key in ("caches_from", "poolers_from"):
        assert f"{key} =" in text, f"config.example.toml does not document policy.{key}"


def test_defaults_are_sane():
    cfg = config.default()
    p = cfg.pressure
    assert p.warn_usage < p.high_usage < p.critical_usage
    assert p.psi_trigger_window_us % 2_000_000 == 0, "unprivileged PSI triggers need 2 s multiples"
    assert cfg.metrics.listen.startswith("127.0.0.1:"), "metrics bind to loopback by default"


@pytest.mark.parametrize("data, message", [
    ({"kill": {"min_rs": 1}}, "kill.min_rs: unknown key (did you mean min_rss?)"),
    ({"pressure": {"warn_usage": 2}}, "pressure.warn_usage: must be between"),
    ({"pressure": {"warn_usage": 0.95}}, "warn_usage < high_usage < critical_usage"),
    ({"kill": {"min_rss": "lots"}}, "kill.min_rss: expected a size"),
    ({"kill": {"enabled": "yes"}}, "kill.enabled: expected true or false"),
    ({"databases": [{"kind": "oracle"}]}, "databases[0].kind: must be one of postgresql, mysql"),
    ({"databases": [{"kind": "postgresql", "dsn": "password=x user=y"}]}, "databases[0].dsn: holds a password"),
    ({"databases": [{"kind": "postgresql", "socket": "/x"}]}, "databases[0].socket: not a postgresql setting"),
    ({"databases": [{"kind": "mysql"}]}, "databases[0]: set host or socket"),
    ({"databases": [{"kind": "mysql", "host": "h", "name": "a"}, {"kind": "mysql", "host": "h", "name": "a"}]},
     "databases[1].name: 'a' is also the name of databases[0]"),
    ({"pressure": {"cgroup": "/tmp/x"}}, "pressure.cgroup: must be a directory under /sys/fs/cgroup/"),
    ({"metrics": {"listen": "9633"}}, "metrics.listen: expected HOST:PORT"),
    ({"bpf": {"enabled": "maybe"}}, 'bpf.enabled: expected true, false or "auto"'),
    ({"general": []}, "general: expected a table"),
])
def test_bad_values_name_their_key(data, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_sizes_parse_with_units():
    assert units.parse_size("512MiB") == 512 * 2**20
    assert units.parse_size("2GB") == 2 * 2**30
    assert units.parse_size("64kB") == 64 * 1024
    assert units.parse_size(4096) == 4096


def test_password_never_read_until_asked_and_missing_env_is_one_line(monkeypatch):
    cfg = config.from_dict({"databases": [{"kind": "postgresql", "password_env": "DBGUARD_TEST_NOPE"}]})
    monkeypatch.delenv("DBGUARD_TEST_NOPE", raising=False)
    with pytest.raises(ConfigError, match="DBGUARD_TEST_NOPE is not set"):
        cfg.databases[0].password()
    monkeypatch.setenv("DBGUARD_TEST_NOPE", "s3cret")
    assert cfg.databases[0].password() == "s3cret"
    assert "s3cret" not in repr(cfg)


# Values of every TOML type, for every key the schema has.
toml_values = st.one_of(st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                        st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
SECTIONS = {"general": General, "pressure": Pressure, "kill": Kill,
            "protection": Protection, "bpf": Bpf, "audit": Audit, "metrics": Metrics}


@st.composite
def fuzzed(draw):
    import dataclasses
    section = draw(st.sampled_from(sorted(SECTIONS)))
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])] + ["not_a_key"]
    key = draw(st.sampled_from(keys))
    return {section: {key: draw(toml_values)}}


@settings(max_examples=500, deadline=None)
@given(fuzzed())
def test_any_value_either_loads_or_fails_with_one_line_naming_the_key(data):
    (section, values), = data.items()
    (key, _), = values.items()
    try:
        cfg = config.from_dict(data)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        assert msg.startswith(f"{section}.{key}") or msg.startswith(section), msg
        return
    assert isinstance(cfg, config.Config)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["kind", "name", "dsn", "host", "socket", "port", "user",
                                                 "shrink_steps", "password_file", "password_env", "bogus"]),
                                toml_values, max_size=4), max_size=3))
def test_database_tables_either_load_or_fail_with_one_line(dbs):
    try:
        config.from_dict({"databases": dbs})
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("databases")


def test_check_config_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[kill]\nmin_rss = -1\n")
    r = subprocess.run([sys.executable, "-m", "dbguard.cli", "check-config", str(bad)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "kill.min_rss" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "dbguard.cli", "check-config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr
    bad.write_text("[kill\n")
    r = subprocess.run([sys.executable, "-m", "dbguard.cli", "check-config", str(bad)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "not valid TOML" in r.stderr
