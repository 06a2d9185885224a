"""The postmaster of a data directory, by fact: postmaster.pid names it and it runs there.

Without SQL the DSN's endpoint finds it: the unix socket's lock file `.s.PGSQL.<port>.lock`
(first line the postmaster's pid, second its data directory), or the process holding the
listening TCP socket (its cwd is the data directory). Either way the candidate counts only if
it runs in that data directory and the directory's postmaster.pid names it.

A server in a container (`ns`, namespaces.py) is found by the same facts as the container
sees them: its paths through its root, the pids in its files mapped to the host's.
"""
from __future__ import annotations

import os

from ...settings import DatabaseConfig
from ...errors import DbguardError
from ...validate import endpoints
from .. import identity
from ..namespaces import HOST, Host
from ..sockets import parse_lock_file

# Where libpq looks when the DSN names no host: Debian's build, then upstream's default.
DEFAULT_SOCKET_DIRS = ("/var/run/postgresql", "/tmp")


def _check(pid: int, data_directory: str, ns: Host = HOST) -> str:
    """'' when host pid `pid` is the postmaster of `data_directory` (runs there, named by its
    postmaster.pid)."""
    why = identity.why_not_server(pid, data_directory, ns=ns)
    if why:
        return why
    pid_file = os.path.join(data_directory, "postmaster.pid")
    try:
        named = identity.pid_in_file(ns.path(pid_file))
    except (OSError, ValueError, DbguardError) as e:
        return f"cannot read {pid_file}: {getattr(e, 'strerror', None) or e}"
    own = ns.ns_pid(pid)
    return "" if named == own else f"{pid_file} names {named}, not {own}"


def _by_lock_file(socket_path: str, ns: Host = HOST) -> identity.Found:
    lock = socket_path + ".lock"
    try:
        with open(ns.path(lock)) as f:
            parsed = parse_lock_file(f.read(4096))
    except (OSError, DbguardError) as e:
        return identity.Found(None, why_not=f"cannot read {lock}{ns.where()}: {getattr(e, 'strerror', None) or e}")
    if parsed is None:
        return identity.Found(None, why_not=f"{lock} is not a PostgreSQL socket lock file")
    named, data_directory = parsed
    pid = ns.host_pid(named)
    if pid is None:
        return identity.Found(None, why_not=f"{lock}: process {named} does not exist{ns.where()}")
    why = _check(pid, data_directory, ns)
    if why:
        return identity.Found(None, why_not=f"{lock}: {why}")
    return identity.Found(pid, data_directory, f"socket lock file {lock}{ns.where()}")


def _by_listener(endpoint: tuple) -> identity.Found:
    pid, why = identity.socket_holder(endpoint)
    if pid is None:
        return identity.Found(None, why_not=why)
    try:
        proc = identity.inspect(pid)
    except identity.Unreadable:
        proc = None
    if proc is None:
        return identity.Found(None, why_not=f"cannot read the working directory of process {pid}")
    why = _check(pid, proc.cwd)
    if why:
        return identity.Found(None, why_not=f"{identity.show_endpoint(endpoint)} is held by process {pid}: {why}")
    return identity.Found(pid, proc.cwd, f"listening socket of {identity.show_endpoint(endpoint)}")


def identify(cfg: DatabaseConfig, data_directory: str = "", ns: Host = HOST) -> identity.Found:
    """The postmaster `cfg` reaches, without logging in. `data_directory`: the configured one,
    or the one SQL reported, tried first. `ns`: the server's container (namespace_of); the pid
    found is the host's."""
    reasons = []
    data_directory = data_directory or cfg.data_directory
    if data_directory:
        # Not root (cwd unreadable): the pid file is the best fact left.
        pid, why = identity.server_pid(os.path.join(data_directory, "postmaster.pid"), data_directory, ns,
                                       trust_unreadable=True)
        if pid is not None:
            return identity.Found(pid, data_directory, f"postmaster.pid in {data_directory}{ns.where()}")
        reasons.append(why)
    for e in endpoints(cfg):
        if e[0] == "unix":
            directory, name = os.path.split(e[1])
            dirs = DEFAULT_SOCKET_DIRS if directory.startswith("(") else (directory,)
            found = [_by_lock_file(os.path.join(d, name), ns) for d in dirs]
        elif ns is not HOST:
            continue                     # validate.py: a server in a container is reached by its socket
        else:
            found = [_by_listener(e)]
        for f in found:
            if f.ok:
                return f
            reasons.append(f.why_not)
    if not reasons:
        reasons.append("the dsn names no host this host can look at (a service file?)")
    return identity.Found(None, why_not="; ".join(reasons))
