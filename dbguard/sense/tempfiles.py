"""Temporary files a process holds open, as the kernel shows them (/proc/PID/fd).

A sort or hash that spills past its memory writes temporary files and keeps them open while
the statement runs: PostgreSQL base/pgsql_tmp/pgsql_tmpPID.N (or <tablespace>/pgsql_tmp/...,
one backend each), MariaDB/MySQL filesort merge runs and on-disk temporary tables in tmpdir
(unlinked at once, held by mariadbd). Their pages are page cache charged to the server's
memory cgroup; a merge reads them back soon, reclaim cannot drop them while dirty, and ending
the statement deletes them. So they are working memory of the sessions, not cache.
"""
from __future__ import annotations

import os
from typing import Callable

PG_TEMP_DIR = "/pgsql_tmp/"
_DELETED = " (deleted)"


def open_file_bytes(pid: int, match: Callable[[str], bool], root: str = "/proc") -> int:
    """Sum of the sizes of the files `pid` has open whose path (as /proc shows it, without
    " (deleted)") `match`es. 0 when the process is gone or its descriptors cannot be read."""
    fd_dir = f"{root}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0
    total = 0
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            if not match(target.removesuffix(_DELETED)):
                continue
            total += os.stat(f"{fd_dir}/{fd}").st_size     # the open file itself, even unlinked
        except OSError:          # closed or gone since the listing
            continue
    return total


def pg_temp_bytes(pid: int) -> int:
    """A PostgreSQL backend's open temporary files."""
    return open_file_bytes(pid, lambda path: PG_TEMP_DIR in path)


def under(dirs: tuple[str, ...]) -> Callable[[str], bool]:
    """Paths in one of `dirs` (MySQL's tmpdir is a ':'-separated list)."""
    prefixes = tuple(d.rstrip("/") + "/" for d in dirs if d)
    return lambda path: path.startswith(prefixes) if prefixes else False


def tmpdirs(value: str) -> tuple[str, ...]:
    """@@tmpdir as a tuple of directories."""
    return tuple(d for d in (value or "").split(":") if d)
