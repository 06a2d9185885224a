"""dbguard.databases.registry: every kind's facts in one place, read by config, classify and the daemon."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dbguard import config
from dbguard.settings import DatabaseConfig
from dbguard.databases import registry
from dbguard.errors import ConfigError
from dbguard.model import Role

REPO = Path(__file__).parents[2]


def test_the_kinds_and_their_facts():
    assert registry.names() == ("postgresql", "mysql")
    pg, my = registry.kind("postgresql"), registry.kind("mysql")
    assert (pg.server_role, pg.child_role, pg.session_noun) == (Role.POSTMASTER, Role.PG_BACKEND, "backend")
    assert (my.server_role, my.child_role, my.session_noun) == (Role.MYSQLD, None, "connection")
    assert registry.server_roles() == {Role.POSTMASTER, Role.MYSQLD}
    assert registry.find("oracle") is None


def test_unknown_kind_is_one_line_naming_the_kinds():
    with pytest.raises(ConfigError) as e:
        registry.kind("oracle")
    assert str(e.value) == "databases.kind: must be one of postgresql, mysql, got 'oracle'"
    with pytest.raises(ConfigError) as e:
        config.from_dict({"databases": [{"kind": "oracle"}]})
    assert str(e.value) == "databases[0].kind: must be one of postgresql, mysql, got 'oracle'"
    with pytest.raises(ConfigError, match="^databases.kind: must be one of postgresql, mysql, got ''$"):
        registry.make(DatabaseConfig(name="x"), "/nonexistent")


def test_every_kind_key_is_a_config_field_and_refused_for_the_other_kind():
    fields = {f.name for f in dataclasses.fields(DatabaseConfig)}
    for k in registry.KINDS.values():
        assert k.config_keys <= fields, k.config_keys - fields
        for key in registry.foreign_keys(k.name):
            assert key not in k.config_keys
            with pytest.raises(ConfigError, match=rf"^databases\[0\]\.{key}: not a {k.name} setting$"):
                config.from_dict({"databases": [{"kind": k.name, "host": "h", key: _value(key)}]}
                                 if k.name == "mysql" else {"databases": [{"kind": k.name, key: _value(key)}]})


def _value(key: str):
    f = {f.name: f for f in dataclasses.fields(DatabaseConfig)}[key]
    return list(f.default) if isinstance(f.default, tuple) else f.default


def test_each_kind_checks_its_own_rules():
    with pytest.raises(ConfigError, match=r"^databases\[0\]\.dsn: holds a password"):
        config.from_dict({"databases": [{"kind": "postgresql", "dsn": "user=x password=y"}]})
    with pytest.raises(ConfigError, match=r"^databases\[0\]: set host or socket for a mysql database$"):
        config.from_dict({"databases": [{"kind": "mysql"}]})


def test_make_builds_the_kind_adapter_without_connecting(tmp_path):
    pg = registry.make(DatabaseConfig(kind="postgresql", name="a", dsn="host=/nowhere"), str(tmp_path))
    my = registry.make(DatabaseConfig(kind="mysql", name="b", socket="/nowhere.sock"), str(tmp_path))
    assert (type(pg).__name__, pg.kind, pg.name) == ("PostgreSQL", "postgresql", "a")
    assert (type(my).__name__, my.kind, my.name) == ("MySQL", "mysql", "b")


def test_importing_the_registry_config_and_classify_loads_no_driver():
    code = ("import sys\n"
            "import dbguard.databases.registry, dbguard.config, dbguard.classify\n"
            "print(sorted(m for m in ('psycopg', 'pymysql') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out
