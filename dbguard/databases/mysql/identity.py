"""The mysqld behind a connection, by fact.

The server pid comes from `@@pid_file` and is accepted only if that process runs with
`@@datadir` as its working directory, is owned by the owner of the data directory, runs an
executable under `@@basedir`, and (over a unix socket) is the peer of our own connection.
A process merely called mysqld gets no role.
"""
from __future__ import annotations

import socket
import struct

from ...sense.procfs import read_proc
from .. import identity


def peer_pid(conn) -> int | None:
    """The pid at the other end of our unix socket (SO_PEERCRED); None over TCP."""
    sock = getattr(conn, "_sock", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None


def server_pid(pid_file: str, datadir: str, basedir: str, peer: int | None) -> tuple[int | None, str]:
    """(pid, "") for the verified mysqld, else (None, why not) in one line."""
    return identity.server_pid(pid_file, datadir, exe_under=basedir, owner_of_datadir=True, peer_pid=peer)


def server_rss(pid: int | None) -> int | None:
    """Resident memory of the server process: a shrink must make it fall, not only the variable."""
    proc = read_proc(pid) if pid else None
    return proc.rss_bytes if proc else None
