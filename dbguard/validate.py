"""Everything `run` would otherwise find out later about a config, found at once.

One validator for `check-config`, `run` and SIGHUP (through config.load): each problem is one
line naming its key, all of them are reported together, and no line ever holds a secret.
static_problems() needs nothing but the config; host_problems() asks this host (users,
password files, directories), as the daemon will when it starts.
"""
from __future__ import annotations

import os
import pwd
import re
import stat
from typing import TYPE_CHECKING

from . import fsafe
from .dsn import parse_dsn, pg_endpoints
from .escape import printable, shown

if TYPE_CHECKING:
    from .settings import Config, DatabaseConfig

CGROUP_ROOT = "/sys/fs/cgroup/"
_LISTEN = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([\w.-]+)):(\d{1,5})$")


def parse_listen(listen: str) -> tuple[str, int] | None:
    """("127.0.0.1", 9633) from "127.0.0.1:9633", IPv6 as "[::1]:9633"; None when malformed.
    Port 0 (any free port) parses: only tests ask for it; the config refuses it."""
    m = _LISTEN.match(listen)
    if not m or int(m.group(3)) > 65535:
        return None
    return m.group(1) or m.group(2), int(m.group(3))


def _path_problem(value: str, key: str, what: str) -> str | None:
    if not value:
        return f"{key}: set a {what}"
    if not value.startswith("/"):
        return f"{key}: must be an absolute path (the daemon's working directory is not yours), got {shown(value)}"
    if ".." in value.split("/"):
        return f"{key}: must not contain '..', got {shown(value)}; write the path it means"
    return None


def _endpoints(db: "DatabaseConfig", opts: dict[str, str] | None) -> list[tuple]:
    if db.kind == "postgresql":
        return pg_endpoints(opts) if opts is not None else []
    if db.socket:
        return [("unix", os.path.normpath(db.socket))]
    return [("tcp", db.host.lower(), str(db.port))] if db.host else []


def endpoints(db: "DatabaseConfig") -> list[tuple]:
    """Where a client of `db` connects: ("unix", socket file) or ("tcp", host, port), one per
    host; a socket in libpq's default directory reads "(libpq's default socket directory)/..."."""
    opts = parse_dsn(db.dsn, "dsn")[0] if db.kind == "postgresql" else None
    return _endpoints(db, opts)


def _namespace_problems(db: "DatabaseConfig", endpoints: list[tuple], key: str) -> list[str]:
    from .databases.namespaces import spec_problem
    why = spec_problem(db.namespace_of)
    if why:
        return [f"{key}.namespace_of: {why}"]
    if not endpoints or any(e[0] != "unix" or not e[1].startswith("/") for e in endpoints):
        where = "host=/socket/directory in dsn" if db.kind == "postgresql" else "socket"
        return [f"{key}.namespace_of: dbguard reaches a server in a container through its unix socket; set "
                f"{where} (the path inside the container), not a TCP address"]
    return []


def _show_endpoint(e: tuple) -> str:
    return f"socket {printable(e[1])}" if e[0] == "unix" else f"host {printable(e[1])} port {e[2]}"


def _database_problems(dbs: tuple["DatabaseConfig", ...]) -> list[str]:
    problems = []
    names: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    for i, db in enumerate(dbs):
        key = f"databases[{i}]"
        if db.name in names:
            problems.append(f"{key}.name: {shown(db.name)} is also the name of databases[{names[db.name]}]")
        names.setdefault(db.name, i)
        # (the DSN's own problems are the postgresql kind's check: databases/registry.py)
        opts = parse_dsn(db.dsn, f"{key}.dsn")[0] if db.kind == "postgresql" else None
        if db.password_file:
            problems += filter(None, [_path_problem(db.password_file, f"{key}.password_file", "file")])
        endpoints = _endpoints(db, opts)
        if db.namespace_of:
            problems += _namespace_problems(db, endpoints, key)
        for e in endpoints:
            e = (*e, db.namespace_of)      # the same socket path in two containers: two servers
            if e in seen:
                problems.append(f"{key}: the same server as databases[{seen[e]}] ({_show_endpoint(e)}); "
                                "list each server once")
                break
            seen[e] = i
    return problems


def static_problems(cfg: "Config") -> list[str]:
    """What is wrong with the config as written, whatever the host."""
    problems = []
    p = cfg.pressure
    if not p.warn_usage < p.high_usage < p.critical_usage:
        problems.append("pressure: warn_usage < high_usage < critical_usage must hold, got "
                        f"{p.warn_usage}, {p.high_usage}, {p.critical_usage}")
    if p.psi_trigger_stall_us >= p.psi_trigger_window_us:
        problems.append("pressure.psi_trigger_stall_us: must be smaller than psi_trigger_window_us")
    if p.cgroup:
        if not p.cgroup.startswith(CGROUP_ROOT):
            problems.append(f"pressure.cgroup: must be a directory under {CGROUP_ROOT}, got {shown(p.cgroup)}")
        elif ".." in p.cgroup.split("/"):
            problems.append(f"pressure.cgroup: must not contain '..', got {shown(p.cgroup)}")
    problems += filter(None, [_path_problem(cfg.general.state_dir, "general.state_dir", "directory"),
                              _path_problem(cfg.audit.path, "audit.path", "file")])
    if cfg.audit.path.endswith("/"):
        problems.append(f"audit.path: names a directory; add the file name, e.g. {shown(cfg.audit.path + 'audit.jsonl')}")
    listen = cfg.metrics.listen
    if listen:
        parsed = parse_listen(listen)
        if parsed is None or parsed[1] == 0:
            problems.append(f"metrics.listen: expected HOST:PORT with a port from 1 to 65535 such as 127.0.0.1:9633 "
                            f'(or "" for no metrics), got {shown(listen)}')
    levels = ("warn", "high", "critical", "never")
    for key in ("caches_from", "poolers_from"):
        value = getattr(cfg.policy, key)
        if value not in levels:
            problems.append(f"policy.{key}: must be one of {', '.join(levels)}, got {shown(value)}")
    return problems + _database_problems(cfg.databases) + _app_cache_problems(cfg)


def _app_cache_problems(cfg: "Config") -> list[str]:
    """[[caches]] and [[poolers]]: names once, each server once, password files as paths."""
    from .caches import registry
    problems = []
    names: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for table in ("caches", "poolers"):
        for i, c in enumerate(getattr(cfg, table)):
            key = f"{table}[{i}]"
            if c.name in names:
                problems.append(f"{key}.name: {shown(c.name)} is also the name of {names[c.name]}")
            names.setdefault(c.name, key)
            if c.password_file:
                problems += filter(None, [_path_problem(c.password_file, f"{key}.password_file", "file")])
            e = registry.endpoint(c, table)
            if e is not None and e.key in seen:
                problems.append(f"{key}: the same server as {seen[e.key]} ({e}); list each server once")
            elif e is not None:
                seen[e.key] = key
    return problems


# --- what only this host can tell --------------------------------------------------------------

def uid_of(name: str) -> int | None:
    """The uid of a user name (or a number), None when this host has no such user."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except (KeyError, ValueError):
        return None


def _password_file_problem(path: str, key: str) -> str | None:
    where = printable(path)
    try:
        st = os.stat(path)      # a link is fine here (Kubernetes mounts secrets through links)
        if not stat.S_ISREG(st.st_mode):
            return f"{key}: {where} is not a regular file"
        if st.st_mode & 0o077:
            return (f"{key}: {where} can be read or written by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 {where}")
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as e:
        return f"{key}: cannot read {where}: {e.strerror}"
    if not first.strip(b"\r\n"):
        return f"{key}: {where} is empty; write the password on its first line"
    return None


def host_problems(cfg: "Config") -> list[str]:
    """What this host would refuse once `run` starts: unknown users, password files others can
    read, directories others can write into, a file where a directory goes."""
    problems = [f"kill.protect_users: no user named {shown(n)} on this host"
                for n in cfg.kill.protect_users if uid_of(n) is None]
    for i, rule in enumerate(cfg.policy.rules):
        problems += [f"policy.rules[{i}].user: no user named {shown(n)} on this host"
                     for n in rule.user if n and uid_of(n) is None]
    for i, db in enumerate(cfg.databases):
        if db.password_file.startswith("/"):
            problems += filter(None, [_password_file_problem(db.password_file, f"databases[{i}].password_file")])
    for table in ("caches", "poolers"):
        for i, c in enumerate(getattr(cfg, table)):
            if c.password_file.startswith("/"):
                problems += filter(None, [_password_file_problem(c.password_file, f"{table}[{i}].password_file")])
    state_dir = cfg.general.state_dir
    if state_dir.startswith("/"):
        why = fsafe.dir_problem(state_dir)
        if why:
            problems.append(f"general.state_dir: {why}")
    audit = cfg.audit.path
    if audit.startswith("/") and not audit.endswith("/"):
        why = fsafe.dir_problem(os.path.dirname(audit))
        if why is None and os.path.islink(audit):
            why = f"{printable(audit)} is a symbolic link; dbguard does not write through links as root"
        elif why is None and os.path.isdir(audit):
            why = f"{printable(audit)} is a directory; add the file name"
        if why:
            problems.append(f"audit.path: {why}")
    return problems
