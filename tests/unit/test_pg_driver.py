"""dbguard.databases.postgresql.driver: psycopg loaded without Python's ssl module and without
asyncio, both of which stay importable for whatever needs them after (and dbguard.lean: shutil
without lzma and bz2, tenacity without asyncio). Each case runs in a fresh interpreter
(imports are process-wide); TLS itself is tests/e2e/test_pg_tls.py, psycopg's async API against a
real server tests/integration/test_lean_imports.py."""
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
import psycopg, tenacity
"""


def test_the_daemons_imports_leave_ssl_asyncio_lzma_and_bz2_out_and_psycopg_whole():
    out = _run(DAEMON_PATH + """
print("ssl" in sys.modules, "_ssl" in sys.modules, "asyncio" in sys.modules, "_asyncio" in sys.modules)
print(opts["sslmode"], not problems, psycopg.pq.version() > 100000, psycopg.pq.__impl__ in ("binary", "c", "python"))
print("shutil" in sys.modules, "lzma" in sys.modules, "_lzma" in sys.modules, "bz2" in sys.modules, "_bz2" in sys.modules)
print(callable(tenacity.Retrying), callable(psycopg.AsyncConnection.connect))
""")
    assert out == ["False", "False", "False", "False", "require", "True", "True", "True",
                   "True", "False", "False", "False", "False", "True", "True"]


def test_with_a_mariadb_too_asyncio_stays_out():
    # PyMySQL loads ssl (it does TLS in Python); then psycopg is imported with it as it is.
    out = _run("""
import sys
import dbguard.databases.mysql.adapter, dbguard.databases.postgresql.adapter, psycopg
print("ssl" in sys.modules, "asyncio" in sys.modules, psycopg.pq.version() > 100000)
""")
    assert out == ["True", "False", "True"]


def test_asyncio_imported_after_is_the_real_one_and_the_async_apis_run_on_it():
    out = _run(DAEMON_PATH + """
import asyncio, inspect
async def main():
    tries = []
    async for attempt in tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(3),
                                                wait=tenacity.wait_fixed(0.01), reraise=True):
        with attempt:
            tries.append(1)
            if len(tries) < 2:
                raise ValueError("once")
    task = psycopg._compat.create_task(asyncio.sleep(0, "slept"))
    event = psycopg.waiting.Event()
    return len(tries), await task, type(event) is asyncio.Event
print(asyncio.__file__.endswith("__init__.py"), inspect.getmodule(asyncio.Queue) is not None, *asyncio.run(main()))
print(psycopg._compat.asyncio.Queue is asyncio.Queue, psycopg.waiting.TimeoutError is asyncio.TimeoutError)
""")
    assert out == ["True", "True", "2", "slept", "True", "True", "True"]


def test_a_module_taking_more_of_asyncio_as_it_is_imported_gets_asyncio_itself(tmp_path):
    (tmp_path / "takes_more.py").write_text("from asyncio import Queue, sleep\nQUEUE = Queue\n")
    out = _run(f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from dbguard import lean
lean.with_asyncio_on_call(lambda: __import__("takes_more"))
import asyncio, takes_more
print(takes_more.QUEUE is asyncio.Queue, takes_more.sleep is asyncio.sleep, type(sys.modules["asyncio"]).__name__)
print("ssl" in sys.modules, asyncio.base_events.ssl)
""")
    assert out == ["True", "True", "module", "False", "None"]


def test_a_failing_import_fails_as_it_would_without_the_stand_in(tmp_path):
    (tmp_path / "broken.py").write_text("from asyncio import sleep\nraise ImportError('no libpq here')\n")
    out = _run(f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from dbguard import lean
try:
    lean.with_asyncio_on_call(lambda: __import__("broken"))
except ImportError as e:
    print(repr(str(e)), "broken" in sys.modules)
""")
    assert out == ["'no", "libpq", "here'", "False"]


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
