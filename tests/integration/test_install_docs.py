"""docs/install.md's copy-paste blocks, as written there, on a real PostgreSQL 15: the grants
give the dbguard role each right its comment names (checked by doing the thing, as the role),
and the pg_hba.conf and pg_ident.conf lines let a root process log in as that role by peer."""
from __future__ import annotations

import re
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "install.md").read_text()

pytestmark = [pytest.mark.root, pytest.mark.db]


def block(name: str) -> str:
    m = re.search(rf"<!-- install-doc-test: {re.escape(name)} -->\n```\w*\n(.*?)```", DOC, re.S)
    assert m, f"docs/install.md has no block marked {name}"
    return m.group(1)


@pytest.fixture(scope="module")
def cluster(postgresql_host):
    from lab.pgcluster import PgCluster
    with PgCluster() as pg:
        pg.psql(block("postgresql-grants"))
        pg.psql("CREATE ROLE app LOGIN")
        yield pg


def connect(pg, user: str):
    return psycopg.connect(pg.dsn_for(user), autocommit=True)


def test_grants_give_each_right_the_doc_names(cluster):
    pg = cluster
    with connect(pg, "dbguard") as c:
        assert not c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        assert c.execute("SHOW data_directory").fetchone()[0] == pg.data_dir
        src = c.execute("SELECT sourcefile FROM pg_settings WHERE name = 'port'").fetchone()[0]
        assert src and src.endswith(".conf"), src
        assert c.execute("SELECT count(*) FROM pg_file_settings").fetchone()[0] > 0
        # shrinking: ALTER SYSTEM and the reload, seen by a new session of someone else
        c.execute("ALTER SYSTEM SET work_mem = '3MB'")
        c.execute("ALTER SYSTEM SET maintenance_work_mem = '5MB'")
        c.execute("ALTER SYSTEM SET hash_mem_multiplier = 1")
        c.execute("SELECT pg_reload_conf()")
        # the postmaster rereads the files asynchronously: a new session of someone else sees it
        until(lambda: connect_show(pg, "postgres", "work_mem") == "3MB", "work_mem = 3MB in a new session")
        c.execute("ALTER SYSTEM RESET work_mem")
        c.execute("ALTER SYSTEM RESET maintenance_work_mem")
        c.execute("ALTER SYSTEM RESET hash_mem_multiplier")
        c.execute("SELECT pg_reload_conf()")
        # a session of another (non-superuser) role: its state is visible, and it can be ended
        with connect(pg, "app") as victim:
            vpid = victim.info.backend_pid
            state = c.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [vpid]).fetchone()[0]
            assert state == "idle", state          # "<insufficient privilege>" shows as NULL without the grant
            assert c.execute("SELECT pg_terminate_backend(%s)", [vpid]).fetchone()[0] is True
        # never a superuser's session
        with connect(pg, "postgres") as su:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT pg_cancel_backend(%s)", [su.info.backend_pid])


def test_grants_are_needed(cluster):
    """The same checks as a role without the grants fail: the test can tell."""
    pg = cluster
    pg.psql("CREATE ROLE nobody_special LOGIN")
    with connect(pg, "nobody_special") as c:
        for sql in ("SHOW data_directory", "SELECT count(*) FROM pg_file_settings",
                    "ALTER SYSTEM SET work_mem = '3MB'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)


def test_root_logs_in_as_dbguard_by_peer_with_the_documented_lines(cluster):
    pg = cluster
    data = Path(pg.data_dir)
    hba, ident = data / "pg_hba.conf", data / "pg_ident.conf"
    original_hba, original_ident = hba.read_text(), ident.read_text()

    def logs_in() -> bool:
        try:
            with connect(pg, "dbguard") as c:
                return c.execute("SELECT current_user").fetchone()[0] == "dbguard"
        except psycopg.OperationalError:
            return False
    try:
        # the lab cluster trusts local users; the doc's line goes first, as the doc says
        hba.write_text(block("pg_hba") + original_hba)
        pg.psql("SELECT pg_reload_conf()")
        until(lambda: not logs_in(), "the peer line refusing root as dbguard without the map")
        ident.write_text(original_ident + block("pg_ident"))
        pg.psql("SELECT pg_reload_conf()")
        until(logs_in, "root logging in as dbguard through the map")
    finally:
        hba.write_text(original_hba)
        ident.write_text(original_ident)
        pg.psql("SELECT pg_reload_conf()")


def connect_show(pg, user: str, name: str) -> str:
    with connect(pg, user) as c:
        return c.execute(f"SHOW {name}").fetchone()[0]


def until(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.1)
