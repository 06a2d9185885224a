"""Local PostgreSQL discovery: on a fixture /proc tree, and against a real throwaway cluster."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dbguard.settings import DatabaseConfig
from dbguard.databases.postgresql.discover import (cluster_name, data_dir_from_cmdline, discover_postgresql,
                                                   parse_postmaster_pid)
from dbguard.databases import registry
from dbguard.databases.postgresql import PostgreSQL
from dbguard.model import Role

PG_EXE = "/usr/lib/postgresql/15/bin/postgres"


def fake_proc(root: Path, pid: int, exe: str, argv: list[str], cwd: Path) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "exe").symlink_to(exe)
    (d / "cwd").symlink_to(cwd)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def pid_file(data: Path, pid: int, port: int, socket_dir: str, listen: str = "127.0.0.1") -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "postmaster.pid").write_text(
        f"{pid}\n{data}\n1700000000\n{port}\n{socket_dir}\n{listen}\n  5432001         0\nready   \n")


def test_fixture_proc_tree(tmp_path):
    proc = tmp_path / "proc"
    main = tmp_path / "var/lib/postgresql/15/main"
    other = tmp_path / "srv/pg"
    fake = tmp_path / "fake"
    pid_file(main, 100, 5432, "/var/run/postgresql")
    pid_file(other, 300, 5433, "", listen="*")
    fake.mkdir()
    # The postmaster, with Debian's config_file naming the cluster.
    fake_proc(proc, 100, PG_EXE, [PG_EXE, "-D", str(main), "-c",
                                  "config_file=/etc/postgresql/15/main/postgresql.conf"], main)
    # Its checkpointer: same exe, same cwd, but not the pid in postmaster.pid.
    fake_proc(proc, 101, PG_EXE, ["postgres: 15/main: checkpointer"], main)
    # A postmaster with a relative -D and no socket: TCP on this host.
    fake_proc(proc, 300, "/opt/pg/bin/postgres", ["postgres", "-D", "pg"], tmp_path / "srv")
    # Merely called postgres: no postmaster.pid in its directory.
    fake_proc(proc, 400, "/tmp/evil/postgres", ["postgres", "-D", str(fake)], fake)
    # Not a postgres binary, though it sits in a data dir whose pid file names it.
    pid_file(tmp_path / "py", 500, 5434, "/tmp")
    fake_proc(proc, 500, "/usr/bin/python3", ["python3"], tmp_path / "py")
    # Postgres binary, but the pid file names another pid (a stale file after a crash).
    pid_file(tmp_path / "stale", 999, 5435, "/tmp")
    fake_proc(proc, 600, PG_EXE, [PG_EXE, "-D", str(tmp_path / "stale")], tmp_path / "stale")
    (proc / "self").symlink_to(proc / "100")     # non-numeric entries are ignored

    found = discover_postgresql(str(proc))
    assert found == [
        DatabaseConfig(kind="postgresql", name="15/main", data_directory=str(main),
                       dsn="host=/var/run/postgresql port=5432 dbname=postgres user=postgres"),
        DatabaseConfig(kind="postgresql", name=str(other), data_directory=str(other),
                       dsn="host=127.0.0.1 port=5433 dbname=postgres user=postgres"),
    ]


def test_parsers():
    assert data_dir_from_cmdline(["-D", "data"], "/srv") == "/srv/data"
    assert data_dir_from_cmdline(["-D/abs/dir"], "/srv") == "/abs/dir"
    assert data_dir_from_cmdline(["--data-directory=/x"], "/srv") == "/x"
    assert data_dir_from_cmdline(["-c", "port=5"], "/cwd") == "/cwd"
    assert cluster_name("/var/lib/postgresql/16/reports", []) == "16/reports"
    assert cluster_name("/data/pg", []) == "/data/pg"
    assert parse_postmaster_pid("garbage") is None
    assert parse_postmaster_pid("12\n/d\n0\n5432\n")["socket"] == ""


@pytest.mark.db
def test_real_cluster_is_discovered_and_usable(tmp_path, postgresql_host):
    # (root: lab.pgcluster runs the server as the postgres OS user, and reading /proc/PID/cwd
    # of its processes needs root too)
    from lab.pgcluster import PgCluster
    with PgCluster() as c:
        mine = [d for d in discover_postgresql() if os.path.realpath(d.data_directory) == os.path.realpath(c.data_dir)]
        assert len(mine) == 1, discover_postgresql()
        assert mine[0] in registry.discover()         # what `dbguard run` without a config finds
        cfg = mine[0]
        assert cfg.kind == "postgresql" and cfg.name == c.data_dir
        assert cfg.dsn == f"host={c.socket_dir} port={c.port} dbname=postgres user=postgres"
        db = PostgreSQL(cfg, str(tmp_path))
        try:
            stats = db.collect()
        finally:
            db.close()
        assert stats.up, stats.error
        assert stats.server_pid == c.postmaster_pid()
        assert stats.roles[stats.server_pid] is Role.POSTMASTER
