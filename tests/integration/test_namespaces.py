"""Databases in other namespaces, on the real kernel: PostgreSQL and MariaDB started under
`unshare --mount --pid --fork` (lab/pod.py) with their data directory, socket and pid file
under /srv/db, a path that exists only inside their pod, and their own pids there (each is
its pod's pid 1). dbguard must find them through /proc/<pid>/root and map their pids through
NSpid. The expected host pids come from the pods themselves (unshare's child) and from this
file's own reading of /proc, never from dbguard's functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dbguard.settings import DatabaseConfig
from dbguard.databases.mysql.adapter import MySQL
from dbguard.databases.postgresql.adapter import PostgreSQL
from dbguard.databases.postgresql.discover import discover_postgresql
from lab.pod import PodMariaDB, PodPostgres
from lab.procs import wait_until

pytestmark = [pytest.mark.db, pytest.mark.root]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pg(postgresql_host):
    with PodPostgres() as pod:
        yield pod


@pytest.fixture(scope="module")
def my(mariadb_host):
    with PodMariaDB() as pod:
        pod.sql("CREATE USER dbguard@localhost IDENTIFIED BY 'pw'")
        pod.sql("GRANT PROCESS, SUPER, CONNECTION ADMIN ON *.* TO dbguard@localhost")
        yield pod


def host_pids_of(pod, ns_pids: list[int]) -> dict[int, int]:
    """ns pid -> host pid, read here from /proc: same pid namespace link as the pod's pid 1,
    and the last NSpid field."""
    ns_link = os.readlink(f"/proc/{pod.host_pid}/ns/pid")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") != ns_link:
                continue
            line = next(ln for ln in Path(f"/proc/{name}/status").read_text().splitlines() if ln.startswith("NSpid"))
        except (OSError, StopIteration):
            continue
        own = int(line.split()[-1])
        if own in ns_pids:
            out[own] = int(name)
    return out


def pg_config(pod, **kw) -> DatabaseConfig:
    return DatabaseConfig(kind="postgresql", name="pod", dsn=pod.dsn, namespace_of=str(pod.host_pid), **kw)


def test_the_pods_files_are_not_on_the_host(pg):
    assert pg.psql("SHOW data_directory") == "/srv/db/data"
    assert not os.path.exists("/srv/db/data/postmaster.pid")
    assert Path(pg.path("/srv/db/data/postmaster.pid")).read_text().split()[0] == "1"   # its own pid 1


def test_postgresql_in_a_pod_is_identified_with_host_pids(pg):
    db = PostgreSQL(pg_config(pg), tempfile.mkdtemp(prefix="dbguard-state-"))
    try:
        s = db.collect()
    finally:
        db.close()
    assert s.up, s.error
    assert s.server_pid == pg.host_pid
    assert s.data_directory == "/srv/db/data"
    listed = [int(x.split("|")[0]) for x in pg.psql("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()").splitlines()]
    want = host_pids_of(pg, listed)
    # Every process the server lists is known to dbguard by its host pid, and by no other pid.
    assert want and set(want.values()) - {pg.host_pid} <= set(s.roles)
    assert all(pid not in listed or pid in want.values() for pid in s.roles)


def test_a_session_in_a_pod_is_cancelled_by_its_host_pid(pg):
    sleeper = subprocess.Popen(["/usr/lib/postgresql/15/bin/psql", "-X", "-h", pg.path(pg.SOCKET_DIR), "-U",
                                "postgres", "-d", "postgres", "-c", "SELECT pg_sleep(60)"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = PostgreSQL(pg_config(pg), tempfile.mkdtemp(prefix="dbguard-state-"))
    try:
        found: list = []

        def sleeping() -> bool:
            found[:] = [x for x in db.collect().sessions if "pg_sleep" in x.query and x.state == "active"]
            return bool(found)
        assert wait_until(sleeping, 20), "the pg_sleep session never showed"
        ns_pid = int(pg.psql("SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"))
        assert found[0].pid == host_pids_of(pg, [ns_pid])[ns_pid] != ns_pid
        out = db.cancel(found[0].pid)
        assert out.ok, out.detail
        _, err = sleeper.communicate(timeout=20)
        assert "canceling statement due to user request" in err
    finally:
        db.close()
        sleeper.kill()
        sleeper.wait()


def test_discovery_finds_postgresql_in_a_pod(pg):
    mine = [c for c in discover_postgresql() if c.namespace_of == str(pg.host_pid)]
    assert len(mine) == 1, discover_postgresql()
    c = mine[0]
    assert c.data_directory == "/srv/db/data" and "host=/srv/db/sock" in c.dsn and "port=5432" in c.dsn
    assert c.name.startswith("/srv/db/data@")


def test_a_namespace_without_the_socket_is_one_line(pg):
    cfg = DatabaseConfig(kind="postgresql", name="pod", dsn=pg.dsn, namespace_of=str(os.getpid()))
    db = PostgreSQL(cfg, tempfile.mkdtemp(prefix="dbguard-state-"))
    try:
        s = db.collect()
    finally:
        db.close()
    assert not s.up and s.server_pid is None
    assert s.error == (f"cannot connect to host=/srv/db/sock port=5432 (namespace_of {os.getpid()}): namespace_of: "
                       f"no process of pid {os.getpid()} sees /srv/db/sock (check the socket path: it is the one "
                       "inside the container)")


def test_mariadb_in_a_pod_is_identified_by_its_host_pid(my, tmp_path, monkeypatch):
    pid_file = tmp_path / "pod.pid"              # as a container runtime writes one
    pid_file.write_text(f"{my.host_pid}\n")
    cfg = DatabaseConfig(kind="mysql", name="podmy", socket=my.SOCKET, user="dbguard", password_env="POD_PW",
                         namespace_of=str(pid_file))
    monkeypatch.setenv("POD_PW", "pw")
    db = MySQL(cfg, str(tmp_path / "state"))
    try:
        s = db.collect()
    finally:
        db.close()
    assert s.up, s.error
    assert s.server_pid == my.host_pid, s.extra
    assert s.data_directory.rstrip("/") == "/srv/db/data"
    assert Path(my.path(my.PID_FILE)).read_text().strip() == "1"


def explain(tmp_path, databases: list[dict], pid: int | None) -> dict:
    from lab.launcher import base_config, toml
    cfg = {**base_config(tmp_path), "databases": databases}
    cfg["general"]["discover"] = False
    (tmp_path / "c.toml").write_text(toml(cfg))
    only = ["--pid", str(pid)] if pid is not None else []
    r = subprocess.run([sys.executable, "-m", "dbguard.cli", "explain", "-c", str(tmp_path / "c.toml"), *only,
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "POD_PW": "pw"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_explain_shows_the_pods_servers_by_host_pid_and_role(pg, my, tmp_path):
    dbs = [{"kind": "postgresql", "name": "pod-pg", "dsn": pg.dsn, "namespace_of": str(pg.host_pid)},
           {"kind": "mysql", "name": "pod-my", "socket": my.SOCKET, "user": "dbguard", "password_env": "POD_PW",
            "namespace_of": str(my.host_pid)}]
    out = explain(tmp_path, dbs, pg.host_pid)
    row, = out["processes"]
    assert (row["role"], row["verdict"]) == ("postmaster", "protected"), row
    assert {d["name"]: d["server_pid"] for d in out["databases"]} == {"pod-pg": pg.host_pid, "pod-my": my.host_pid}
    assert all(d["identity"].endswith(f"in the namespace of pid {d['server_pid']}") for d in out["databases"]), \
        out["databases"]
    row, = explain(tmp_path, dbs, my.host_pid)["processes"]
    assert (row["role"], row["verdict"]) == ("mysqld", "protected"), row


def test_without_sql_the_pods_servers_are_found_by_their_sockets(pg, my, tmp_path, monkeypatch):
    # A refused login: the PostgreSQL socket's lock file (through the pod's root, its pid the
    # pod's own) and the process holding MariaDB's listening socket still name the servers.
    cfg = DatabaseConfig(kind="postgresql", name="pod", dsn=pg.dsn.replace("user=postgres", "user=nosuchrole"),
                         namespace_of=str(pg.host_pid))
    db = PostgreSQL(cfg, str(tmp_path / "pg-state"))
    try:
        s = db.collect()
    finally:
        db.close()
    assert not s.up and "nosuchrole" in s.error
    assert s.server_pid == pg.host_pid, s.identity
    monkeypatch.setenv("POD_PW", "wrong")
    cfg = DatabaseConfig(kind="mysql", name="podmy", socket=my.SOCKET, user="dbguard", password_env="POD_PW",
                         namespace_of=str(my.host_pid))
    db = MySQL(cfg, str(tmp_path / "my-state"))
    try:
        s = db.collect()
    finally:
        db.close()
    assert not s.up and "login refused" in s.error
    assert s.server_pid == my.host_pid, s.identity


def test_discovery_finds_mariadb_in_a_pod_and_reaches_it(my, tmp_path):
    from dbguard.databases.mysql.discover import discover_mysql
    mine = [c for c in discover_mysql() if c.namespace_of == str(my.host_pid)]
    assert len(mine) == 1, discover_mysql()
    assert mine[0].socket == my.SOCKET and mine[0].name.startswith("mysql:/srv/db/data")
    db = MySQL(mine[0], str(tmp_path / "state"))
    try:
        s = db.collect()
    finally:
        db.close()
    assert s.up, s.error
    assert s.server_pid == my.host_pid


def test_two_pods_with_their_own_limits_are_each_watched_in_their_own_scope(make_cgroup, tmp_path, postgresql_host,
                                                                           mariadb_host, monkeypatch):
    # One dbguard, two pods each under its own limit: explain shows one scope per pod, each
    # with its own database and its own processes.
    a, b = make_cgroup(400 * 2**20), make_cgroup(500 * 2**20)
    monkeypatch.setenv("POD_PW", "pw")
    with PodPostgres(a) as pgpod, PodMariaDB(b) as mypod:
        mypod.sql("CREATE USER dbguard@localhost IDENTIFIED BY 'pw'")
        mypod.sql("GRANT PROCESS, SUPER, CONNECTION ADMIN ON *.* TO dbguard@localhost")
        dbs = [{"kind": "postgresql", "name": "pod-pg", "dsn": pgpod.dsn, "namespace_of": str(a.path)},
               {"kind": "mysql", "name": "pod-my", "socket": mypod.SOCKET, "user": "dbguard",
                "password_env": "POD_PW", "namespace_of": str(b.path)}]
        out = explain(tmp_path, dbs, None)
        servers = (pgpod.host_pid, mypod.host_pid)
    pg, my = out["scopes"]
    assert (pg["memory"]["cgroup"], pg["memory"]["limit_bytes"]) == (str(a.path), 400 * 2**20), pg["memory"]
    assert (my["memory"]["cgroup"], my["memory"]["limit_bytes"]) == (str(b.path), 500 * 2**20), my["memory"]
    assert [d["name"] for d in pg["databases"]] == ["pod-pg"] and [d["name"] for d in my["databases"]] == ["pod-my"]
    assert "own memory cgroup holds the limit" in pg["memory"]["scope"] and "not watched" not in pg["memory"]["scope"]
    rows = {s: {r["pid"]: r for r in scope["processes"]} for s, scope in zip(("pg", "my"), (pg, my))}
    assert rows["pg"][servers[0]]["role"] == "postmaster" and servers[0] not in rows["my"]
    assert rows["my"][servers[1]]["role"] == "mysqld" and servers[1] not in rows["pg"]
