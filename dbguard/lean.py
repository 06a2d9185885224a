"""Standard-library modules other modules load for nothing dbguard does, kept out of the daemon.

The daemon keeps every module it imports for as long as it runs.

`shutil` imports `lzma` and `bz2` (their modules, liblzma and libbz2: about 0.4 MiB resident)
only to learn whether it can make .tar.xz and .tar.bz2 archives, in a guarded import that
treats them as optional; argparse loads shutil for the terminal's width, and psycopg loads it
through ctypes.util. dbguard makes no archives. So shutil is imported first here, with those
two absent: it says it cannot make such archives, and a later `import lzma` anywhere gets the
real module.

`asyncio` (1.3 MiB of the daemon's resident memory; benchmarks/RESULTS.md, "dbguard's own
cost") is imported by psycopg and tenacity for their async APIs (psycopg's AsyncConnection and
AsyncCopy, tenacity's AsyncRetrying), which dbguard never calls: they take a few of its
functions by name as they are imported, and reach for the rest through the module when an
async call runs. So they are imported with a stand-in for asyncio (`with_asyncio_on_call`):
each name in ON_CALL is a function that loads asyncio and calls asyncio's own when it is first
called, any other name asked for later loads asyncio and is asyncio's. A version that asks for
another name as it is imported is imported again with asyncio itself (then nothing is saved,
and tests/unit/test_pg_driver.py, which checks the daemon's imports, says so).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Callable, Iterator

ARCHIVE_ONLY = ("lzma", "bz2")
# What psycopg 3.1 and tenacity 8 take from asyncio by name as they are imported.
ON_CALL = frozenset({"create_task", "get_event_loop", "wait_for", "Event", "sleep"})


@contextlib.contextmanager
def absent(*names: str) -> Iterator[None]:
    """`import NAME` raises ImportError inside, for each of `names` not loaded already; outside,
    it imports the real module again."""
    added = [n for n in names if n not in sys.modules]
    for name in added:
        sys.modules[name] = None        # type: ignore[assignment]
    try:
        yield
    finally:
        for name in added:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_shutil() -> None:
    """shutil without lzma and bz2, unless it is loaded already (then nothing is left to save)."""
    if "shutil" not in sys.modules:
        with absent(*ARCHIVE_ONLY):
            import shutil  # noqa: F401


def real_asyncio() -> types.ModuleType:
    """asyncio itself, loaded now if it is not yet."""
    if isinstance(sys.modules.get("asyncio"), _AsyncioOnCall):
        del sys.modules["asyncio"]
    return importlib.import_module("asyncio")


def _on_call(name: str) -> Callable:
    def call(*args, **kwargs):
        return getattr(real_asyncio(), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"asyncio.{name}, loaded when first called (dbguard.lean)"
    return call


class _AsyncioOnCall(types.ModuleType):
    """What `import asyncio` gives inside with_asyncio_on_call."""

    importing = False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "TimeoutError":
            return TimeoutError                 # asyncio's is the builtin (Python 3.11 on)
        if self.importing:
            if name in ON_CALL:
                return _on_call(name)
            # The import fails, and with_asyncio_on_call imports again with asyncio itself.
            raise AttributeError(f"dbguard.lean stands in for asyncio's {', '.join(sorted(ON_CALL))} only, not {name}")
        return getattr(real_asyncio(), name)


STAND_IN = _AsyncioOnCall("asyncio", "stands in for asyncio while psycopg and tenacity are imported (dbguard.lean)")


def with_asyncio_on_call(do_import: Callable[[], object]) -> None:
    """do_import() with STAND_IN for asyncio, unless asyncio is loaded already; where that
    fails, do_import() again after loading asyncio itself, without Python's ssl module unless
    that is loaded already (asyncio's `import ssl` is guarded; why ssl is kept out:
    dbguard.databases.postgresql.driver)."""
    if "asyncio" in sys.modules:
        do_import()
        return
    sys.modules["asyncio"] = STAND_IN
    STAND_IN.importing = True
    try:
        do_import()
        return
    except Exception:           # noqa: BLE001 - whatever it was, the import is made again below
        pass
    finally:
        STAND_IN.importing = False
        if sys.modules.get("asyncio") is STAND_IN:
            del sys.modules["asyncio"]
    with absent("ssl"):
        real_asyncio()
    do_import()
