"""Which MySQL / MariaDB server a connection reached: the identity the originals file is keyed by.

MySQL has `@@server_uuid` (auto.cnf in the data directory). MariaDB has no server_uuid, and
neither `@@server_id` (1 unless the DBA numbers servers for replication) nor the feedback
plugin's Server_uid (made from the host's MAC address and the port: a server re-created on the
same port keeps it) tell two installations apart. What does: the UUID in Aria's control file
(`aria_log_control`, bytes 4-19 after the magic fe fe 0c and a version byte), written once when
the data directory is created; Aria holds MariaDB's own system tables since 10.4, so every
MariaDB data directory has one. A copied data directory (a restored backup) copies it too, so
the data directory is part of the identity either way.
"""
from __future__ import annotations

import os

from ... import fsafe

ARIA_CONTROL = "aria_log_control"
_ARIA_MAGIC = b"\xfe\xfe\x0c"


def aria_uuid(directory: str) -> str:
    """The UUID of the Aria control file in `directory`; '' when it cannot be read (not root)."""
    try:
        head = fsafe.read_small(os.path.join(directory, ARIA_CONTROL))[:20]
    except (OSError, ValueError):
        return ""
    if len(head) < 20 or not head.startswith(_ARIA_MAGIC):
        return ""
    return head[4:20].hex()


def server_identity(conn, mariadb: bool) -> dict[str, str] | None:
    """{"server_uuid" or "aria_uuid", "datadir"}; None when nothing identifies the server."""
    cur = conn.cursor()
    cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('server_uuid', 'datadir', 'aria_log_dir_path')")
    v = {k.lower(): val for k, val in cur.fetchall()}
    datadir = v.get("datadir", "")
    if mariadb:
        uuid = aria_uuid(v.get("aria_log_dir_path") or datadir)
        key = "aria_uuid"
    else:
        uuid, key = v.get("server_uuid", ""), "server_uuid"
    ident = {k: val for k, val in ((key, uuid), ("datadir", datadir)) if val}
    return ident or None
