"""Find the local MySQL / MariaDB servers, for `dbguard run` without a config.

By fact: a process running a MySQL server executable (registry: mysqld, mariadbd) that holds
a listening socket, whose parent does not run one too (a server's helper children inherit
nothing to listen on, but say it anyway). dbguard connects over that unix socket as root,
which Debian's MariaDB lets in by unix_socket authentication; over TCP when it has no socket.

A server in a container (namespaces.py) is found by the sockets of its own network namespace
(/proc/<pid>/net/unix) and reached through that socket inside its root (namespace_of = its
host pid); TCP into a container's network namespace is not ours to reach.
"""
from __future__ import annotations

import os

from ...settings import DatabaseConfig
from .. import identity, registry, sockets
from ..namespaces import Namespace, container_name, of_process


def _server(proc_root: str, pid: int, exes: frozenset[str]) -> DatabaseConfig | None:
    try:
        proc = identity.inspect(pid, proc_root)
    except identity.Unreadable:
        return None
    if proc is None or os.path.basename(proc.exe) not in exes:
        return None
    ns = of_process(pid, proc_root)
    if isinstance(ns, Namespace):
        return _in_container(pid, proc.cwd, ns)
    paths, tcp = sockets.listening_of(pid, proc_root)
    if paths:
        return DatabaseConfig(kind="mysql", name=f"mysql:{proc.cwd}", socket=paths[0], user="root")
    if tcp:
        t = tcp[0]
        host = "127.0.0.1" if t.address in ("0.0.0.0", "::") else t.address
        return DatabaseConfig(kind="mysql", name=f"mysql:{proc.cwd}", host=host, port=t.port, user="root")
    return None


def _in_container(pid: int, cwd: str, ns: Namespace) -> DatabaseConfig | None:
    held = set()
    for fd in _listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            held.add(int(link[8:-1]))
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            table = sockets.parse_unix(f.read())
    except OSError:
        return None
    paths = sorted(p for p, inode in table.items() if inode in held)
    if not paths:
        return None
    return DatabaseConfig(kind="mysql", name=f"mysql:{cwd}@{container_name(ns)}", socket=paths[0], user="root",
                          namespace_of=str(pid))


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def discover_mysql(proc_root: str = "/proc") -> list[DatabaseConfig]:
    """Every running MySQL / MariaDB server under `proc_root`, in pid order."""
    exes = registry.kind("mysql").executables
    found = []
    for name in sorted((n for n in os.listdir(proc_root) if n.isdigit()), key=int):
        cfg = _server(proc_root, int(name), exes)
        if cfg is not None:
            found.append(cfg)
    return found
