"""Standard-library modules other modules load for nothing dbguard does, kept out of the daemon.

The daemon keeps every module it imports for as long as it runs. `shutil` imports `lzma` and
`bz2` (their modules, liblzma and libbz2: about 0.4 MiB resident) only to learn whether it can
make .tar.xz and .tar.bz2 archives, in a guarded import that treats them as optional; argparse
loads shutil for the terminal's width, and psycopg loads it through ctypes.util. dbguard makes
no archives. So shutil is imported first here, with those two absent: it says it cannot make
such archives, and a later `import lzma` anywhere gets the real module.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

ARCHIVE_ONLY = ("lzma", "bz2")


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
