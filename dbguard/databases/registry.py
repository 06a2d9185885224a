"""The database kinds dbguard knows, each with its own facts, in one place.

A kind declares what the rest of dbguard needs to know about it: the role of its server
process and of a child of that server, what a session is called, the config keys only it
accepts (and its own config checks), its adapter and how to find local servers without a
config. Adding a kind is one package under databases/ and one entry here; classify, config,
the daemon and the policy read these facts instead of switching on the kind's name.

Importing this module imports no database driver: adapters and discovery are named as
"module:attribute" and imported on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError
from ..model import Role

if TYPE_CHECKING:
    from ..settings import DatabaseConfig
    from .base import Database
    from .identity import Found


@dataclass(frozen=True)
class Kind:
    name: str                          # the `kind` in [[databases]]
    server_role: Role                  # the server process (found by fact, see databases/identity.py)
    child_role: Role | None            # a child of the server not (yet) reported by SQL; None: no default
    reported_pids_verified: bool       # True: every pid the adapter reports was checked by fact, so it
                                       # counts without being a child of the server (MySQL reports only
                                       # the mysqld pid it verified; PostgreSQL reports every backend,
                                       # and a backend is believed only as a child of the postmaster)
    session_noun: str                  # what one session is called in a target: "backend", "connection"
    caps_at_connect: bool              # the shrunk per-session settings reach a session only when it
                                       # connects (MySQL), not at its next statement (PostgreSQL's reload)
    config_keys: frozenset[str]        # [[databases]] keys only this kind accepts
    check: Callable[["DatabaseConfig", str], None]   # its own config rules; raises ConfigError
    adapter: str                       # "module:Class" implementing databases.base.Database
    identify: str                      # "module:function" DatabaseConfig -> identity.Found, without SQL
    executables: frozenset[str]        # basenames of the server's executables: a process running one
                                       # is never a kill candidate, configured or not (classify.py)
    discover: str | None = None        # "module:function" -> [DatabaseConfig] of local servers
    # Where distributions install the server's executable (globs): a task running one of these
    # files (by inode and device) is never killed in the kernel, its server identified or not.
    install_paths: tuple[str, ...] = ()


def _check_postgresql(db: "DatabaseConfig", path: str) -> None:
    from ..dsn import parse_dsn     # libpq's own parser: a password in any form, never quoted
    problems = parse_dsn(db.dsn, f"{path}.dsn")[1]
    if problems:
        raise ConfigError(*problems)


def _check_mysql(db: "DatabaseConfig", path: str) -> None:
    if not (db.host or db.socket):
        raise ConfigError(f"{path}: set host or socket for a mysql database")


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind(name="postgresql", server_role=Role.POSTMASTER, child_role=Role.PG_BACKEND,
         reported_pids_verified=False, session_noun="backend", caps_at_connect=False,
         config_keys=frozenset({"dsn", "data_directory", "shrink_settings", "shrink_floor", "close_idle_after"}),
         check=_check_postgresql, adapter="dbguard.databases.postgresql.adapter:PostgreSQL",
         identify="dbguard.databases.postgresql.identity:identify",
         executables=frozenset({"postgres", "postmaster"}),
         discover="dbguard.databases.postgresql.discover:discover_postgresql",
         install_paths=("/usr/lib/postgresql/*/bin/postgres", "/usr/pgsql-*/bin/postgres",
                        "/usr/local/pgsql/bin/postgres", "/usr/bin/postgres", "/usr/libexec/postgresql*/postgres")),
    # MySQL sessions are threads of mysqld: a child process of the server is not a session.
    Kind(name="mysql", server_role=Role.MYSQLD, child_role=None,
         reported_pids_verified=True, session_noun="connection", caps_at_connect=True,
         config_keys=frozenset({"host", "port", "socket", "user", "buffer_pool_floor", "shrink_caches",
                                "session_memory_cap"}),
         check=_check_mysql, adapter="dbguard.databases.mysql.adapter:MySQL",
         identify="dbguard.databases.mysql.identity:identify", executables=frozenset({"mysqld", "mariadbd"}),
         discover="dbguard.databases.mysql.discover:discover_mysql",
         install_paths=("/usr/sbin/mariadbd", "/usr/sbin/mysqld", "/usr/libexec/mariadbd",
                        "/usr/libexec/mysqld", "/usr/bin/mariadbd", "/usr/bin/mysqld",
                        "/usr/local/mysql/bin/mysqld", "/usr/local/mysql/bin/mariadbd")),
)}


def names() -> tuple[str, ...]:
    return tuple(KINDS)


def find(name: str) -> Kind | None:
    return KINDS.get(name)


def kind(name: str, path: str = "databases.kind") -> Kind:
    """The kind called `name`; an unknown one is a one-line config error at `path` naming the kinds."""
    k = KINDS.get(name)
    if k is None:
        raise ConfigError(f"{path}: must be one of {', '.join(KINDS)}, got {name!r}")
    return k


def foreign_keys(name: str) -> frozenset[str]:
    """Config keys some other kind accepts and `name` does not."""
    own = kind(name).config_keys
    return frozenset().union(*(k.config_keys for k in KINDS.values())) - own


def server_roles() -> frozenset[Role]:
    return frozenset(k.server_role for k in KINDS.values())


def server_executables() -> frozenset[str]:
    """Basenames of every known database server executable."""
    return frozenset().union(*(k.executables for k in KINDS.values()))


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def make(cfg: "DatabaseConfig", state_dir: str) -> "Database":
    """The adapter for one [[databases]] entry."""
    return _load(kind(cfg.kind).adapter)(cfg, state_dir)


def identify(cfg: "DatabaseConfig") -> "Found":
    """The server one [[databases]] entry reaches, found by fact without logging in."""
    return _load(kind(cfg.kind).identify)(cfg)


def discover() -> list["DatabaseConfig"]:
    """Local servers of every kind that can be found without a config, kind by kind."""
    found: list[DatabaseConfig] = []
    for k in KINDS.values():
        if k.discover:
            found.extend(_load(k.discover)())
    return found
