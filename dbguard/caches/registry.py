"""The kinds of application cache ([[caches]]) and pooler ([[poolers]]) dbguard knows.

Like databases/registry.py: a kind declares its table, the keys it refuses, its own config
checks (pure: the url or DSN parsed here, never a connection) and its adapter, named as
"module:Class" and imported on first use, so reading a config imports no protocol client.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError
from .endpoint import BadUrl, Endpoint, host_port, redis_url

if TYPE_CHECKING:
    from .base import AppCache


@dataclass(frozen=True)
class Kind:
    name: str
    table: str                                     # "caches" or "poolers"
    refused_keys: frozenset[str]                   # keys of its table this kind has no use for
    endpoint: Callable[[Any], Endpoint | None]     # where it listens, from its config; raises BadUrl
    adapter: str                                   # "module:Class" implementing caches.base.AppCache
    check: Callable[[Any, str], list[str]] | None = None   # more rules of its own: problems


def _pgbouncer_endpoint(c) -> Endpoint | None:
    from ..dsn import parse_dsn, pg_endpoints
    opts, _ = parse_dsn(c.dsn, "")
    found = pg_endpoints(opts) if opts is not None else []
    if not found:
        return None
    e = found[0]
    return Endpoint("unix", path=e[1]) if e[0] == "unix" else Endpoint("tcp", host=e[1], port=int(e[2]))


def _check_pgbouncer(c, path: str) -> list[str]:
    from ..dsn import parse_dsn
    if not c.dsn:
        return [f'{path}.dsn: set the admin console\'s DSN, e.g. "host=/run/postgresql port=6432 '
                'dbname=pgbouncer user=pgbouncer"']
    opts, problems = parse_dsn(c.dsn, f"{path}.dsn")
    if opts is not None and opts.get("dbname", "pgbouncer") != "pgbouncer":
        problems.append(f"{path}.dsn: dbname must be pgbouncer (the admin console), got {opts['dbname'][:40]!r}")
    return problems


KINDS: dict[tuple[str, str], Kind] = {(k.table, k.name): k for k in (
    # Valkey speaks the same protocol and reports the same INFO and CONFIG: kind = "redis".
    Kind("redis", "caches", frozenset(), lambda c: redis_url(c.url), "dbguard.caches.redis:Redis"),
    # memcached's text protocol has no password (SASL is binary-protocol only).
    Kind("memcached", "caches", frozenset({"password_file", "password_env"}), lambda c: host_port(c.url),
         "dbguard.caches.memcached:Memcached"),
    Kind("pgbouncer", "poolers", frozenset(), _pgbouncer_endpoint, "dbguard.caches.pgbouncer:PgBouncer",
         _check_pgbouncer),
)}


def kind(table: str, name: str, path: str) -> Kind:
    """The kind `name` of [[table]]; an unknown one is one line naming the kinds there are."""
    k = KINDS.get((table, name))
    if k is None:
        names = [n for t, n in KINDS if t == table]
        raise ConfigError(f"{path}: must be one of {', '.join(names)}, got {name!r}"[:300])
    return k


def problems(k: Kind, c, path: str) -> list[str]:
    """What is wrong with one [[caches]]/[[poolers]] entry as written."""
    if k.check is not None:
        return k.check(c, path)
    if not c.url:
        return [f"{path}.url: set where the {k.name} server listens"]
    try:
        k.endpoint(c)
    except BadUrl as e:
        return [f"{path}.url: {e}"]
    return []


def endpoint(c, table: str) -> Endpoint | None:
    """Where an entry's server listens; None when its config does not say (or is bad)."""
    try:
        return KINDS[(table, c.kind)].endpoint(c)
    except (KeyError, BadUrl):
        return None


def make(c, table: str, state_dir: str) -> "AppCache":
    module, _, attr = KINDS[(table, c.kind)].adapter.partition(":")
    return getattr(importlib.import_module(module), attr)(c, state_dir)
