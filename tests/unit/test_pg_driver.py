"""dbguard.databases.postgresql.driver: psycopg loaded without Python's ssl module, which stays
importable for whatever needs it after (and dbguard.lean: shutil without lzma and bz2). Each
case runs in a fresh interpreter (imports are process-wide); TLS itself is
tests/e2e/test_pg_tls.py."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


DAEMON_PATH = """
import sys
import dbguard.cli, dbguard.daemon
from dbguard import dsn
opts, problems = dsn.parse_dsn("host=127.0.0.1 port=5 sslmode=require dbname=x", "dsn")
import dbguard.databases.postgresql.adapter, dbguard.caches.pgbouncer
import asyncio.base_events, asyncio.sslproto, psycopg
"""


def test_the_daemons_imports_leave_ssl_lzma_and_bz2_out_and_psycopg_whole():
    out = _run(DAEMON_PATH + """
print("ssl" in sys.modules, "_ssl" in sys.modules, asyncio.base_events.ssl, asyncio.sslproto.ssl)
print(opts["sslmode"], not problems, psycopg.pq.version() > 100000, psycopg.pq.__impl__ in ("binary", "c", "python"))
print("shutil" in sys.modules, "lzma" in sys.modules, "_lzma" in sys.modules, "bz2" in sys.modules, "_bz2" in sys.modules)
""")
    assert out == ["False", "False", "None", "None", "require", "True", "True", "True",
                   "True", "False", "False", "False", "False"]


def test_ssl_imported_after_is_the_real_module():
    out = _run(DAEMON_PATH + """
import ssl, pymysql.connections
print(ssl.__file__.endswith("ssl.py"), hasattr(ssl, "create_default_context"), pymysql.connections.SSL_ENABLED)
""")
    assert out == ["True", "True", "True"]


def test_lzma_and_bz2_imported_after_are_the_real_modules():
    out = _run(DAEMON_PATH + """
import bz2, lzma, shutil
print(lzma.decompress(lzma.compress(b"x")) == b"x", bz2.decompress(bz2.compress(b"x")) == b"x",
      "gztar" in dict(shutil.get_archive_formats()), "xztar" in dict(shutil.get_archive_formats()))
""")
    assert out == ["True", "True", "True", "False"]


def test_lean_leaves_loaded_modules_alone():
    out = _run("""
import lzma, sys
from dbguard import lean
with lean.absent("lzma", "nosuchmodule"):
    print(sys.modules["lzma"] is lzma, sys.modules["nosuchmodule"])
print(sys.modules["lzma"] is lzma, "nosuchmodule" in sys.modules)
""")
    assert out == ["True", "None", "True", "False"]


def test_ssl_already_loaded_is_left_alone():
    out = _run("""
import ssl, sys
from dbguard.databases.postgresql.driver import psycopg
import asyncio.base_events
print(asyncio.base_events.ssl is ssl, sys.modules["ssl"] is ssl, psycopg.pq.version() > 100000)
""")
    assert out == ["True", "True", "True"]


def test_every_dbguard_module_takes_psycopg_from_the_driver():
    # One that imported psycopg first would load ssl after all (memory only, never a failure).
    direct = re.compile(r"^\s*(import psycopg\b|from psycopg\b)", re.M)
    found = [str(p.relative_to(REPO)) for p in (REPO / "dbguard").rglob("*.py")
             if p.name != "driver.py" and direct.search(p.read_text())]
    assert found == []
