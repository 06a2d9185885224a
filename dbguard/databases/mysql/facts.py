"""What a MySQL / MariaDB server is, read once per connection: they change only with a restart.

Pure: from the rows of SHOW GLOBAL VARIABLES and SHOW GRANTS.
"""
from __future__ import annotations

import dataclasses

from .grants import Grants

MiB = 1024**2

FACT_VARIABLES = ("version", "innodb_buffer_pool_chunk_size", "innodb_buffer_pool_instances",
                  "innodb_buffer_pool_size_max", "innodb_buffer_pool_size_auto_min", "innodb_page_size")


@dataclasses.dataclass(frozen=True)
class ServerFacts:
    """The server's version, resize flavour and units, grants, and the peer of our socket."""

    mariadb: bool
    version: str
    session_resize: bool       # MariaDB >= 10.11.12: synchronous, 1 MiB units, abortable
    unit: int                  # resize granularity in bytes
    page_size: int
    auto_min: int | None       # MariaDB innodb_buffer_pool_size_auto_min
    grants: Grants
    peer_pid: int | None


def server_facts(v: dict[str, str], grant_lines: list[str], peer: int | None) -> ServerFacts:
    """Pure: the facts from SHOW GLOBAL VARIABLES and SHOW GRANTS."""
    version = v["version"]
    mariadb = "mariadb" in version.lower()
    session_resize = mariadb and "innodb_buffer_pool_size_max" in v
    if session_resize:
        unit = MiB
    else:
        unit = int(v.get("innodb_buffer_pool_chunk_size") or MiB) * int(v.get("innodb_buffer_pool_instances") or 1)
    auto_min = v.get("innodb_buffer_pool_size_auto_min")
    return ServerFacts(mariadb=mariadb, version=version, session_resize=session_resize, unit=unit,
                       page_size=int(v.get("innodb_page_size") or 16384),
                       auto_min=int(auto_min) if auto_min is not None else None,
                       grants=Grants.parse(grant_lines), peer_pid=peer)

