"""Temporary files a process holds open, as the kernel shows them (/proc/PID/fd).

A PostgreSQL sort or hash that spills past work_mem writes base/pgsql_tmp/pgsql_tmpPID.N
(or <tablespace>/pgsql_tmp/...) and keeps it open while the statement runs. Its pages are
page cache charged to the server's memory cgroup; while dirty or under writeback reclaim
cannot drop them, and cancelling the statement deletes the file and frees them. So they
are part of what a session holds.
"""
from __future__ import annotations

import os

PG_TEMP_DIR = "/pgsql_tmp/"


def open_file_bytes(pid: int, marker: str, root: str = "/proc") -> int:
    """Sum of the sizes of the regular files `pid` has open whose path contains `marker`.
    0 when the process is gone or its descriptors cannot be read."""
    fd_dir = f"{root}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0
    total = 0
    for fd in fds:
        try:
            if marker not in os.readlink(f"{fd_dir}/{fd}"):
                continue
            total += os.stat(f"{fd_dir}/{fd}").st_size     # the open file itself, through the link
        except OSError:          # closed or gone since the listing
            continue
    return total


def pg_temp_bytes(pid: int) -> int:
    return open_file_bytes(pid, PG_TEMP_DIR)
