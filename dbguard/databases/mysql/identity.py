"""The mysqld behind a connection, by fact.

The server pid comes from `@@pid_file` and is accepted only if that process runs with
`@@datadir` as its working directory, is owned by the owner of the data directory, runs an
executable under `@@basedir`, and (over a unix socket) is the peer of our own connection.
A process merely called mysqld gets no role. Without SQL, `identify` finds it from the
configured socket or port alone.
"""
from __future__ import annotations

import os
import socket
import struct

from ...settings import DatabaseConfig
from ...sense.procfs import read_proc
from .. import identity, registry
from ..namespaces import HOST, Host


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


def server_pid(pid_file: str, datadir: str, basedir: str, peer: int | None,
               ns: Host = HOST) -> tuple[int | None, str]:
    """(host pid, "") for the verified mysqld, else (None, why not) in one line. `ns`: the
    server's namespaces when it runs in a container (its variables name its own paths and pid;
    SO_PEERCRED already gives the host's pid)."""
    return identity.server_pid(pid_file, datadir, ns, exe_under=basedir, owner_of_datadir=True, peer_pid=peer)


def server_rss(pid: int | None) -> int | None:
    """Resident memory of the server process: a shrink must make it fall, not only the variable."""
    proc = read_proc(pid) if pid else None
    return proc.rss_bytes if proc else None


def identify(cfg: DatabaseConfig, ns: Host = HOST) -> identity.Found:
    """The mysqld / mariadbd `cfg` reaches, without logging in: the process holding the
    listening socket (unix or TCP), if it runs a MySQL server executable (not a proxy in
    front of one); its working directory is the data directory. `ns`: its container."""
    from ...validate import endpoints
    reasons = []
    for e in endpoints(cfg):
        pid, why = identity.socket_holder(e, ns=ns)
        if pid is None:
            reasons.append(why)
            continue
        try:
            proc = identity.inspect(pid)
        except identity.Unreadable:
            proc = None
        if proc is None:
            reasons.append(f"cannot read process {pid} holding {identity.show_endpoint(e)}")
            continue
        exes = registry.kind("mysql").executables
        if os.path.basename(proc.exe) not in exes:
            reasons.append(f"{identity.show_endpoint(e)} is held by process {pid} ({proc.exe or '?'}), "
                           f"not a MySQL server ({', '.join(sorted(exes))})")
            continue
        return identity.Found(pid, proc.cwd, f"listening socket of {identity.show_endpoint(e)}{ns.where()}")
    return identity.Found(None, why_not="; ".join(reasons) or "set host or socket")
