"""PostgreSQL connection strings, read by libpq's own parser (through psycopg): the options,
where a client would connect, and what must never be written in one."""
from __future__ import annotations

import os
import re

from .escape import shown

# libpq options that carry a secret; none may be written in a DSN, which ends up in logs,
# process listings and `explain`.
SECRET_OPTIONS = ("password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key")
PG_DEFAULT_PORT = 5432


def _libpq_keywords() -> frozenset[str]:
    from .databases.postgresql.driver import psycopg     # without Python's ssl module
    return frozenset(o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults())


def _redacted(message: str, keywords: frozenset[str]) -> str:
    """libpq's parse error with every quoted piece of the DSN replaced, except option names:
    the piece it quotes can be the password ("invalid percent-encoded token: "s%3cret"")."""
    text = " ".join(message.split())
    return re.sub(r'"([^"]*)"', lambda m: m.group(0) if m.group(1) in keywords or m.group(1) in "=:/]"
                  else '"…"', text)


def parse_dsn(dsn: str, key: str) -> tuple[dict[str, str] | None, list[str]]:
    """(options, problems) of a PostgreSQL DSN or URI, parsed by libpq; options is None when
    it does not parse. A password in any form is a problem, and never quoted."""
    from .databases.postgresql.driver import psycopg     # without Python's ssl module
    try:
        opts = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    except (psycopg.Error, ValueError) as e:      # ValueError: a NUL byte
        return None, [f"{key}: not a libpq connection string or URI: {_redacted(str(e), _libpq_keywords())}"]
    problems = [f"{key}: holds a {k} (in some form libpq reads); use password_file or password_env instead, "
                "and change the password if this file was shared" for k in SECRET_OPTIONS if k in opts]
    for port in filter(None, opts.get("port", "").split(",")):
        if not port.strip().isdigit() or not 1 <= int(port) <= 65535:
            problems.append(f"{key}: port {shown(port)} is not a port number (1-65535)")
    return opts, problems


def pg_endpoints(opts: dict[str, str]) -> list[tuple]:
    """Where libpq would connect: ("unix", socket file) or ("tcp", host, port), one per host."""
    if "service" in opts:
        return []                       # pg_service.conf decides: not ours to read
    hosts = (opts.get("hostaddr") or opts.get("host") or "").split(",")
    ports = [p.strip() for p in opts.get("port", "").split(",")]
    out = []
    for i, host in enumerate(hosts):
        port = ports[i] if i < len(ports) else ports[0] if len(ports) == 1 else ""
        port = port or str(PG_DEFAULT_PORT)
        if not host or host.startswith("/") or host.startswith("@"):
            where = os.path.normpath(host) if host.startswith("/") else host or "(libpq's default socket directory)"
            out.append(("unix", f"{where}/.s.PGSQL.{port}"))
        else:
            out.append(("tcp", host.lower(), port))
    return out
