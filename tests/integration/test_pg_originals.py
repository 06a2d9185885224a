"""The DBA's PostgreSQL settings survive dbguard: keyed by the server, read server-wide, never
written over. Real throwaway PostgreSQL 15 clusters (lab.pgcluster).

Every expected value comes from the server or its files read independently of dbguard's code:
postgresql.auto.conf as text, SHOW in a session of a role without role settings,
pg_db_role_setting, pg_controldata.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from dbguard.settings import DatabaseConfig
from dbguard.databases.postgresql import PostgreSQL

pytestmark = pytest.mark.db

MiB = 1024**2


def make_cfg(dsn: str, name: str = "pg", **kw) -> DatabaseConfig:
    """The sizes alone unless `kw` says otherwise (hash_mem_multiplier has its own test below)."""
    return DatabaseConfig(**{**dict(kind="postgresql", name=name, dsn=dsn, shrink_floor=1 * MiB, shrink_steps=5,
                                    shrink_settings=("work_mem", "maintenance_work_mem"), connect_timeout=2.0,
                                    statement_timeout=2.0), **kw})


def auto_conf(cluster) -> dict[str, str]:
    """postgresql.auto.conf's entries as the file has them (the ALTER SYSTEM values)."""
    text = Path(cluster.data_dir, "postgresql.auto.conf").read_text()
    return {m[1]: m[2] for m in re.finditer(r"^(\w+) = '([^']*)'$", text, re.M)}


def shown(cluster, name: str, user: str = "postgres") -> str:
    """SHOW in a new session as `user` (after a reload: a new session reads the new config)."""
    return cluster.psql(f"SHOW {name}", user=user)


def role_settings(cluster) -> list[str]:
    return cluster.psql("SELECT coalesce(r.rolname, '*') || ':' || coalesce(d.datname, '*') || ':' || "
                        "array_to_string(s.setconfig, ',') FROM pg_db_role_setting s "
                        "LEFT JOIN pg_roles r ON r.oid = s.setrole LEFT JOIN pg_database d ON d.oid = s.setdatabase "
                        "ORDER BY 1").splitlines()


def reload(cluster) -> None:
    cluster.psql("SELECT pg_reload_conf()")


@pytest.fixture
def cluster(postgresql_host):
    from lab.pgcluster import PgCluster
    with PgCluster(settings={"shared_buffers": "32MB"}) as c:
        c.psql("CREATE ROLE app LOGIN")
        yield c


def test_two_clusters_under_one_name_one_after_another(postgresql_host, tmp_path, caplog):
    """A state file left by the first cluster is never applied to the second that got its name."""
    from lab.pgcluster import PgCluster
    with PgCluster(settings={"shared_buffers": "32MB"}) as first:
        first.psql("ALTER SYSTEM SET work_mem = '8MB'")
        reload(first)
        db = PostgreSQL(make_cfg(first.dsn), str(tmp_path))
        assert db.set_shrink_step(2).ok
        db.close()                        # dbguard dies with the first cluster shrunk
        assert auto_conf(first)["work_mem"] == "2MB"
    assert (tmp_path / "originals-pg.json").exists()

    with PgCluster(settings={"shared_buffers": "32MB"}) as second:
        second.psql("ALTER SYSTEM SET work_mem = '16MB'")
        second.psql("ALTER SYSTEM SET maintenance_work_mem = '96MB'")
        reload(second)
        before = auto_conf(second)
        db = PostgreSQL(make_cfg(second.dsn), str(tmp_path))
        try:
            with caplog.at_level(logging.WARNING, logger="dbguard"):
                out = db.recover()
                db.collect()
            assert auto_conf(second) == before == {"work_mem": "16MB", "maintenance_work_mem": "96MB"}
            assert (shown(second, "work_mem"), shown(second, "maintenance_work_mem")) == ("16MB", "96MB")
            warnings = [r.getMessage() for r in caplog.records if "another server" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
            assert "never applied" in warnings[0] and "\n" not in warnings[0]
            aside = list(tmp_path.glob("originals-pg.json.other-server-*"))
            assert len(aside) == 1 and aside[0].name in warnings[0], (aside, warnings)
            assert not (tmp_path / "originals-pg.json").exists()
            assert out.ok, out.detail

            # Protection goes on with the second cluster's own values.
            assert db.set_shrink_step(1).ok
            assert db.originals.load()["identity"]["system_identifier"] == second.system_identifier()
            assert db.originals.load()["settings"]["work_mem"]["value"] == "16MB"
            assert db.set_shrink_step(0).ok
            assert auto_conf(second) == before
        finally:
            db.close()


def test_role_and_database_settings_are_not_the_originals(cluster, tmp_path):
    """ALTER ROLE / ALTER DATABASE ... SET reach dbguard's own session; the originals are server-wide."""
    cluster.psql("ALTER SYSTEM SET work_mem = '8MB'")          # the DBA's server-wide value
    cluster.psql("ALTER ROLE postgres SET work_mem = '1MB'")   # dbguard's own login
    cluster.psql("ALTER DATABASE postgres SET maintenance_work_mem = '3MB'")
    cluster.psql("ALTER ROLE app SET maintenance_work_mem = '5MB'")
    reload(cluster)
    roles_before, auto_before = role_settings(cluster), auto_conf(cluster)
    assert shown(cluster, "work_mem") == "1MB"                  # what dbguard's session sees

    db = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
    try:
        out = db.set_shrink_step(1)
        assert out.ok, out.detail
        saved = db.originals.load()["settings"]
        assert saved["work_mem"] == {"value": "8MB", "bytes": 8 * MiB, "auto_conf": True, "set": "4MB"}
        assert saved["maintenance_work_mem"]["bytes"] == 64 * MiB and not saved["maintenance_work_mem"]["auto_conf"]
        assert auto_conf(cluster) == {"work_mem": "4MB", "maintenance_work_mem": "32MB"}

        out = db.set_shrink_step(0)
        assert out.ok, out.detail
        # The DBA's ALTER SYSTEM is back as written; no entry where there was none; the role and
        # database settings never touched.
        assert auto_conf(cluster) == auto_before == {"work_mem": "8MB"}
        assert role_settings(cluster) == roles_before
        cluster.psql("CREATE ROLE plain LOGIN")
        assert shown(cluster, "work_mem", user="plain") == "8MB"
        assert shown(cluster, "work_mem") == "1MB"
        assert shown(cluster, "maintenance_work_mem", user="app") == "5MB"
        assert db.originals.load() is None
    finally:
        db.close()


def test_dba_changes_during_a_shrink_are_kept(cluster, tmp_path, caplog):
    cluster.psql("ALTER SYSTEM SET work_mem = '8MB'")
    cluster.psql("ALTER SYSTEM SET maintenance_work_mem = '64MB'")
    cluster.psql("ALTER SYSTEM SET temp_buffers = '16MB'")
    reload(cluster)
    cfg = dataclasses.replace(make_cfg(cluster.dsn), shrink_settings=("work_mem", "maintenance_work_mem",
                                                                      "temp_buffers"))
    db = PostgreSQL(cfg, str(tmp_path))
    try:
        out = db.set_shrink_step(2)
        assert out.ok, out.detail
        assert auto_conf(cluster) == {"work_mem": "2MB", "maintenance_work_mem": "16MB", "temp_buffers": "4MB"}

        # While shrunk the DBA sets work_mem with ALTER SYSTEM, resets temp_buffers, and gives a role its own value.
        cluster.psql("ALTER SYSTEM SET work_mem = '24MB'")
        cluster.psql("ALTER SYSTEM RESET temp_buffers")
        cluster.psql("ALTER ROLE app SET work_mem = '6MB'")
        reload(cluster)

        with caplog.at_level(logging.WARNING, logger="dbguard"):
            out = db.set_shrink_step(1)           # a grow step: only what is still dbguard's moves
        assert out.ok, out.detail
        assert auto_conf(cluster) == {"work_mem": "24MB", "maintenance_work_mem": "32MB"}
        assert "work_mem was changed by someone else" in out.detail and "'24MB'" in out.detail, out.detail
        assert "temp_buffers was changed by someone else" in out.detail and "no entry" in out.detail, out.detail
        assert "\n" not in out.detail
        warned = [r.getMessage() for r in caplog.records if "changed by someone else" in r.getMessage()]
        assert len(warned) == 2, warned
        assert set(db.originals.load()["settings"]) == {"maintenance_work_mem"}

        # Deeper again under new pressure: still never over the DBA's values.
        assert db.set_shrink_step(3).ok
        assert auto_conf(cluster) == {"work_mem": "24MB", "maintenance_work_mem": "8MB"}

        out = db.set_shrink_step(0)
        assert out.ok, out.detail
        assert auto_conf(cluster) == {"work_mem": "24MB", "maintenance_work_mem": "64MB"}
        cluster.psql("CREATE ROLE plain LOGIN")
        assert (shown(cluster, "work_mem", user="plain"), shown(cluster, "maintenance_work_mem", user="plain"),
                shown(cluster, "temp_buffers", user="plain")) == ("24MB", "64MB", "8MB")   # 8MB: built-in default
        assert shown(cluster, "work_mem", user="app") == "6MB"
        assert db.originals.load() is None
    finally:
        db.close()


def test_a_state_file_without_identity_is_applied_only_where_dbguard_left_its_values(cluster, tmp_path):
    """A file in the format before identity was recorded: what dbguard set is put back, what
    someone else set since is kept."""
    import json
    cluster.psql("ALTER SYSTEM SET work_mem = '2MB'")              # as dbguard at step 2 of 8MB would have left it
    cluster.psql("ALTER SYSTEM SET maintenance_work_mem = '40MB'")  # not what step 2 of 64MB gives: someone else's
    reload(cluster)
    legacy = {"step": 2, "saved_at": 1.0, "settings": {
        "work_mem": {"value": "8MB", "bytes": 8 * MiB, "auto_conf": True},
        "maintenance_work_mem": {"value": "64MB", "bytes": 64 * MiB, "auto_conf": False}}}
    (tmp_path / "originals-pg.json").write_text(json.dumps(legacy))
    (tmp_path / "originals-pg.json").chmod(0o600)
    db = PostgreSQL(make_cfg(cluster.dsn), str(tmp_path))
    try:
        out = db.recover()
        assert out.carried_out, out.detail
        assert auto_conf(cluster) == {"work_mem": "8MB", "maintenance_work_mem": "40MB"}
        assert "maintenance_work_mem was changed by someone else" in out.detail, out.detail
        assert db.originals.load() is None
    finally:
        db.close()


def test_a_role_setting_hiding_the_server_value_needs_pg_file_settings(cluster, tmp_path):
    """Without superuser, a role setting on dbguard's login hides the server-wide value: refuse
    with the grant that fixes it, change nothing; with the grant, the originals are server-wide."""
    cluster.psql("CREATE ROLE guard LOGIN; GRANT pg_read_all_settings TO guard; "
                 "GRANT ALTER SYSTEM ON PARAMETER work_mem, maintenance_work_mem TO guard; "
                 "GRANT EXECUTE ON FUNCTION pg_reload_conf() TO guard; ALTER ROLE guard SET work_mem = '1MB'")
    cluster.psql("ALTER SYSTEM SET work_mem = '8MB'")
    reload(cluster)
    before = auto_conf(cluster)
    db = PostgreSQL(make_cfg(cluster.dsn_for("guard")), str(tmp_path))
    try:
        out = db.set_shrink_step(1)
        assert not out.ok and "GRANT SELECT ON pg_file_settings TO guard" in out.detail, out.detail
        assert "\n" not in out.detail
        assert auto_conf(cluster) == before and db.originals.load() is None

        cluster.psql("GRANT SELECT ON pg_file_settings TO guard; "
                     "GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO guard")
        out = db.set_shrink_step(1)
        assert out.ok, out.detail
        assert db.originals.load()["settings"]["work_mem"]["value"] == "8MB"
        assert auto_conf(cluster)["work_mem"] == "4MB"
        assert db.set_shrink_step(0).ok
        assert auto_conf(cluster) == before
    finally:
        db.close()


def test_one_server_listed_twice_is_refused_at_start(cluster, tmp_path):
    """By its socket and by 127.0.0.1: two endpoints check-config cannot tell apart, one server.
    `dbguard run` refuses to start with one line naming both entries, and changes nothing."""
    import subprocess
    from lab.launcher import REPO, base_config, dbguard_command, toml
    cluster.psql("ALTER ROLE postgres PASSWORD 'pw'")
    pw = tmp_path / "pg.password"
    pw.write_text("pw\n")
    pw.chmod(0o600)
    cfg = base_config(tmp_path)
    cfg["bpf"] = {"enabled": False}
    cfg["general"]["lock_memory"] = False
    cfg["databases"] = [
        {"kind": "postgresql", "name": "by_socket", "dsn": cluster.dsn},
        {"kind": "postgresql", "name": "by_tcp", "dsn": cluster.tcp_dsn_for("postgres"), "password_file": str(pw)}]
    path = tmp_path / "dbguard.toml"
    path.write_text(toml(cfg))
    before = auto_conf(cluster)
    checked = subprocess.run(dbguard_command("check-config", str(path)), cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr        # the endpoints differ: only the server can tell
    r = subprocess.run(dbguard_command("run", "--config", str(path)), cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dbguard: ")]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "by_socket and by_tcp reach the same server" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "pw" not in lines[0].split("reach")[0]
    assert auto_conf(cluster) == before and not list((tmp_path / "state").glob("originals-*"))


def test_hash_mem_multiplier_is_shrunk_with_the_sizes_and_the_dbas_value_comes_back(cluster, tmp_path):
    """The default shrink_settings: hash_mem_multiplier, a number, halved toward 1 beside the
    sizes; the DBA's ALTER SYSTEM text back as written, and a setting they never set RESET."""
    cluster.psql("ALTER SYSTEM SET hash_mem_multiplier = 3")
    cluster.psql("ALTER SYSTEM SET work_mem = '8MB'")
    reload(cluster)
    cfg = DatabaseConfig(kind="postgresql", name="pg", dsn=cluster.dsn, shrink_floor=1 * MiB)
    assert cfg.shrink_settings == ("work_mem", "maintenance_work_mem", "hash_mem_multiplier")
    db = PostgreSQL(cfg, str(tmp_path))
    try:
        assert db.set_shrink_step(1).ok
        assert auto_conf(cluster) == {"hash_mem_multiplier": "1.5", "work_mem": "4MB", "maintenance_work_mem": "32MB"}
        assert shown(cluster, "hash_mem_multiplier") == "1.5"
        saved = db.originals.load()["settings"]["hash_mem_multiplier"]
        assert (saved["value"], saved["number"], saved["auto_conf"]) == ("3", 3.0, True)
        assert db.set_shrink_step(3).ok
        assert auto_conf(cluster)["hash_mem_multiplier"] == "1"           # never below the server's minimum
        assert db.collect().shrink_step == 3
        assert db.set_shrink_step(0).ok
        assert auto_conf(cluster) == {"hash_mem_multiplier": "3", "work_mem": "8MB"}
        assert shown(cluster, "hash_mem_multiplier") == "3" and shown(cluster, "maintenance_work_mem") == "64MB"
        assert db.originals.load() is None
    finally:
        db.close()
