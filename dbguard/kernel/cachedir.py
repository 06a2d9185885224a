"""Where the compile cache (kernel.objcache) keeps its entries: <state_dir>/bpf/PREFIX<key>SUFFIX.
Apart from objcache so that the daemon can see whether anything is kept without importing
objcache, whose hashlib maps libcrypto."""
from __future__ import annotations

from pathlib import Path

PREFIX, SUFFIX = "programs-", ".json"


def kept_entries(directory: str | Path) -> list[Path]:
    """The cache's entries in `directory` (none when it is missing)."""
    return sorted(Path(directory).glob(f"{PREFIX}*{SUFFIX}"))
