"""`dbguard run` reaches a PostgreSQL that is asked for TLS (sslmode=require): libpq does the
TLS, and the daemon has not loaded Python's ssl module for it (databases/postgresql/driver.py).
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun, base_config

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.db]

MiB = 1024 * 1024
PASSWORD = "tls-test-password"


@pytest.fixture(scope="module")
def tls_cluster():
    """A throwaway PostgreSQL with ssl = on (a self-signed certificate), in its own memory
    cgroup; TCP logins need the postgres role's password."""
    from lab.pgcluster import PgCluster
    certs = tempfile.mkdtemp(prefix="dbguard-tls-")
    os.chmod(certs, 0o755)
    crt, key = os.path.join(certs, "server.crt"), os.path.join(certs, "server.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-keyout", key, "-out", crt], check=True, capture_output=True, timeout=60)
    pg = pwd.getpwnam("postgres")
    for f in (crt, key):
        os.chown(f, pg.pw_uid, pg.pw_gid)
    os.chmod(key, 0o600)      # the server refuses a key others can read
    try:
        with MemoryCgroup(1000 * MiB) as cg, PgCluster(settings={"ssl": "on", "ssl_cert_file": crt, "ssl_key_file": key},
                                                       cgroup=cg) as c:
            c.psql(f"ALTER ROLE postgres PASSWORD '{PASSWORD}'")
            yield c, cg
    finally:
        shutil.rmtree(certs, ignore_errors=True)


def _tls_of(cluster, application_name: str) -> list[str]:
    return cluster.psql("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                        f"WHERE a.application_name = '{application_name}'").split()


# psycopg's libpq wrappers: "binary" (psycopg-binary's own libpq and OpenSSL, pip installs) and
# "python" (ctypes over the distribution's libpq5, as the .deb runs it); both import ssl for its side effect.
LIBPQ_OF = {"binary": "psycopg_binary.libs/libpq", "python": "/libpq.so.5"}


@pytest.mark.parametrize("impl", sorted(LIBPQ_OF))
def test_sslmode_require_reached_over_tls_without_python_ssl(tls_cluster, tmp_path, monkeypatch, impl):
    cluster, cg = tls_cluster
    monkeypatch.setenv("PSYCOPG_IMPL", impl)        # dbguard run inherits it
    pw = tmp_path / "pg.password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    cfg = base_config(tmp_path, cg.path)
    cfg["bpf"] = {"enabled": False}
    cfg["databases"] = [{"name": "tls", "kind": "postgresql", "dsn": cluster.tcp_dsn_for("postgres") + " sslmode=require",
                         "password_file": str(pw)}]
    with DbguardRun(tmp_path, cfg) as run:
        run.wait_protecting(timeout=30, settle=1.0)
        tls = _tls_of(cluster, "dbguard")
        maps = Path(f"/proc/{run.pid}/maps").read_text()
        output = run.output(None)
    assert tls == ["t"], f"dbguard's connection over TLS: {tls} (its output: {output[-2000:]})"
    assert "database tls:" not in output, output[-2000:]      # said when the database is not reached
    assert "/_ssl." not in maps, "Python's ssl module was loaded"
    assert LIBPQ_OF[impl] in maps, f"not psycopg's {impl} libpq"


def test_sslmode_require_is_refused_by_a_server_without_tls(tmp_path):
    """The other side of the test above: sslmode=require is libpq's to enforce, and it does
    in dbguard (the first test could not pass on a plain connection)."""
    from lab.pgcluster import PgCluster
    with MemoryCgroup(1000 * MiB) as cg, PgCluster(cgroup=cg) as cluster:
        cluster.psql(f"ALTER ROLE postgres PASSWORD '{PASSWORD}'")
        pw = tmp_path / "pg.password"
        pw.write_text(PASSWORD + "\n")
        pw.chmod(0o600)
        cfg = base_config(tmp_path, cg.path)
        cfg["bpf"] = {"enabled": False}
        cfg["databases"] = [{"name": "tls", "kind": "postgresql",
                             "dsn": cluster.tcp_dsn_for("postgres") + " sslmode=require", "password_file": str(pw)}]
        with DbguardRun(tmp_path, cfg) as run:
            run.wait_protecting(timeout=30)
            output = run.output(None)
    assert "server does not support SSL" in output, output[-2000:]
