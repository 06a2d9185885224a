"""psycopg imported as the daemon imports it (dbguard.databases.postgresql.driver: without
Python's ssl module and with dbguard.lean's stand-in for asyncio) against a real PostgreSQL 15
(lab.pgcluster): its synchronous API runs without asyncio ever loaded, and its async API, which
dbguard never calls, still runs for whoever does, on asyncio loaded at that first call. Each
case runs in a fresh interpreter (imports are process-wide)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PRELUDE = """
import sys
import dbguard.daemon, dbguard.databases.postgresql.adapter
from dbguard.databases.postgresql.driver import psycopg
dsn = sys.argv[1]
"""


@pytest.fixture(scope="module")
def cluster(postgresql_host):
    from lab.pgcluster import PgCluster
    with PgCluster() as c:
        yield c


def _run(code: str, dsn: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PRELUDE + code, dsn], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.root
@pytest.mark.db
def test_the_synchronous_api_runs_without_asyncio(cluster):
    out = _run("""
from dbguard.databases.retry import retry, exponential
def query():
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()[0]
print(retry(query, lambda e: False, attempts=2, within=5.0, wait=exponential(0.1, 1.0)))
print("asyncio" in sys.modules, "ssl" in sys.modules)
""", cluster.dsn)
    assert out == ["15", "False", "False"]


@pytest.mark.root
@pytest.mark.db
def test_the_async_api_runs_on_asyncio_loaded_at_its_first_call(cluster):
    out = _run("""
print("asyncio" in sys.modules)
import asyncio
async def main():
    # connect and wait for results: psycopg.waiting's loop, events and timeouts, on asyncio
    async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=5) as conn:
        cur = await conn.execute("SELECT pg_sleep(0.05), 6 * 7")
        return (await cur.fetchone())[1], type(sys.modules["asyncio"]).__name__
print(*asyncio.run(main()))
""", cluster.dsn)
    assert out == ["False", "42", "module"]
