"""psycopg for all of dbguard, imported without Python's `ssl` module and without asyncio.

libpq does TLS itself (sslmode=require, verify-full: its own libssl, its own certificates);
nothing in dbguard or in psycopg's synchronous API uses Python's ssl module. psycopg.pq's
implementations import it for a side effect only ("sets up Python's libcrypto callbacks"
before libpq's, which PQinitOpenSSL(1, 0) then skips), which costs the daemon about 4 MiB of
resident memory for nothing (_ssl, the pages of libssl and libcrypto 3 its initialisation
touches, the module's objects; benchmarks/RESULTS.md, "dbguard's own cost"). Those locking
callbacks ended with OpenSSL 1.1.0, which locks itself; the Python dbguard runs on (3.11+)
requires OpenSSL 1.1.1 (PEP 644), and psycopg-binary's libpq has its own libcrypto besides.
So psycopg is imported with an empty module standing in for ssl, and with dbguard.lean's
stand-in for asyncio, which psycopg imports for its async API (where a psycopg takes more of
asyncio as it is imported than that stand-in gives, asyncio itself is loaded, with ssl absent,
as asyncio allows: its `import ssl` is guarded).

Both stand-ins are gone before this module's import ends: anything that imports ssl or
asyncio later (PyMySQL) gets the real one. No other thread imports either in that window:
psycopg is first imported when the config is loaded, before any thread starts, or for a
PostgreSQL discovered later, while only the metrics server's thread and, with a MariaDB
configured, PyMySQL's calls run (neither imports asyncio), and PyMySQL has loaded ssl already
(then it is left as it is).
Every dbguard module takes psycopg from here; one that imported it first would only cost
the memory (tests/unit/test_pg_driver.py checks the daemon's imports).

psycopg also loads shutil (through ctypes.util): it gets dbguard.lean's, without lzma and bz2.
"""
from __future__ import annotations

import sys
import types

from ... import lean

STAND_IN_DOC = "stands in for Python's ssl module while psycopg is imported (dbguard.databases.postgresql.driver)"


def _import_psycopg() -> None:
    if "ssl" in sys.modules:
        import psycopg  # noqa: F401  (ssl loaded already: nothing left to save)
        return
    sys.modules["ssl"] = types.ModuleType("ssl", STAND_IN_DOC)
    try:
        import psycopg  # noqa: F401,F811
    finally:
        del sys.modules["ssl"]


def _import_lean() -> None:
    if "psycopg" not in sys.modules:
        lean.import_shutil()
        lean.with_asyncio_on_call(_import_psycopg)


_import_lean()

import psycopg  # noqa: E402  (loaded above)
from psycopg import sql  # noqa: E402

__all__ = ["psycopg", "sql"]
