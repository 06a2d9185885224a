"""Find the local PostgreSQL servers, for `dbguard run` without a config.

By fact, not by name: a process counts as a postmaster only if its executable is a postgres
binary AND the data directory it runs in holds a postmaster.pid whose first line is that
very pid. Children (checkpointer, backends) run in the same directory but are not the pid
in the file; a process merely called postgres has no such file.

A postmaster in a container (another mount namespace: a pod, `unshare --mount`) is found the
same way, as the container sees it (namespaces.py): its data directory and postmaster.pid
through its root, the pid in the file compared with the pid it has there. Its entry gets
namespace_of = its host pid, so dbguard connects through the socket inside that root.
"""
from __future__ import annotations

import os
import re

from ...settings import DatabaseConfig
from ...errors import DbguardError
from .. import identity, registry
from ..namespaces import Namespace, container_name, of_process

POSTGRES_EXES = registry.kind("postgresql").executables
# postmaster.pid lines (0-based): pid, data dir, start time, port, socket dir, listen address
_PID, _PORT, _SOCKET, _LISTEN = 0, 3, 4, 5
_DEBIAN_DATA = re.compile(r"^/var/lib/postgresql/([^/]+)/([^/]+)/?$")
_DEBIAN_CONF = re.compile(r"^/etc/postgresql/([^/]+)/([^/]+)/postgresql\.conf$")


# --- pure parsers --------------------------------------------------------------------------------
def data_dir_from_cmdline(argv: list[str], cwd: str) -> str:
    """The -D argument (resolved against the process's cwd), else the cwd: postgres chdirs there."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "-D" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("-D") and len(arg) > 2:
            value = arg[2:]
        elif arg.startswith("--data-directory="):
            value = arg.split("=", 1)[1]
        if value:
            return os.path.normpath(os.path.join(cwd, value))
    return cwd


def cluster_name(data_dir: str, argv: list[str]) -> str:
    """Debian's "15/main" when the layout says so, else the data directory."""
    for i, arg in enumerate(argv):
        conf = arg.split("config_file=", 1)[1] if "config_file=" in arg else None
        if conf:
            m = _DEBIAN_CONF.match(conf)
            if m:
                return f"{m.group(1)}/{m.group(2)}"
    m = _DEBIAN_DATA.match(data_dir)
    return f"{m.group(1)}/{m.group(2)}" if m else data_dir


def parse_postmaster_pid(text: str) -> dict[str, str] | None:
    """pid, port, socket dir and listen address from postmaster.pid text; None if malformed."""
    lines = text.splitlines()
    if len(lines) < 4 or not lines[_PID].strip().isdigit() or not lines[_PORT].strip().isdigit():
        return None
    get = lambda i: lines[i].strip() if len(lines) > i else ""    # noqa: E731
    return {"pid": get(_PID), "port": get(_PORT), "socket": get(_SOCKET), "listen": get(_LISTEN)}


def dsn_for(info: dict[str, str]) -> str:
    host = info["socket"].split(",")[0].strip()
    if not host:   # no unix socket: the first TCP listen address, "*" meaning this host
        listen = info["listen"].split(",")[0].strip()
        host = "127.0.0.1" if listen in ("", "*", "0.0.0.0") else ("::1" if listen == "::" else listen)
    return f"host={host} port={info['port']} dbname=postgres user=postgres"


# --- reading /proc -------------------------------------------------------------------------------
def _postmaster(proc_root: str, pid: int) -> DatabaseConfig | None:
    try:
        proc = identity.inspect(pid, proc_root)
        with open(f"{proc_root}/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except (OSError, identity.Unreadable):
        return None
    if proc is None or os.path.basename(proc.exe) not in POSTGRES_EXES:
        return None
    ns = of_process(pid, proc_root)
    if ns is None:
        return None
    data_dir = data_dir_from_cmdline(argv[1:], proc.cwd)
    try:
        with open(ns.path(os.path.join(data_dir, "postmaster.pid"))) as f:
            info = parse_postmaster_pid(f.read())
    except (OSError, DbguardError):
        return None
    if info is None or int(info["pid"]) != ns.ns_pid(pid):
        return None
    name = cluster_name(data_dir, argv)
    if isinstance(ns, Namespace):
        name = f"{name}@{container_name(ns)}"
    return DatabaseConfig(kind="postgresql", name=name, dsn=dsn_for(info), data_directory=data_dir,
                          namespace_of=str(pid) if isinstance(ns, Namespace) else "")


def discover_postgresql(proc_root: str = "/proc") -> list[DatabaseConfig]:
    """Every running postmaster under `proc_root`, in pid order."""
    found = []
    for name in sorted((n for n in os.listdir(proc_root) if n.isdigit()), key=int):
        cfg = _postmaster(proc_root, int(name))
        if cfg is not None:
            found.append(cfg)
    return found
