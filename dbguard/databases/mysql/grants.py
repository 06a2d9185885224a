"""What dbguard needs to be granted on MySQL / MariaDB, and what the connected user lacks."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Grants:
    """Global privileges of the connected user, as SHOW GRANTS lists them."""

    privileges: frozenset[str]

    @classmethod
    def parse(cls, lines: list[str]) -> "Grants":
        privs: set[str] = set()
        for line in lines:
            if " ON *.* TO " not in line.upper():
                continue
            body = line[len("GRANT "):line.upper().index(" ON *.* TO ")]
            privs.update(p.strip().upper() for p in body.split(","))
        return cls(frozenset(privs))

    def has(self, *any_of: str) -> bool:
        return "ALL PRIVILEGES" in self.privileges or any(p in self.privileges for p in any_of)


def needed_grants(mariadb: bool) -> dict[str, tuple[str, ...]]:
    """What dbguard does -> the privileges any one of which allows it."""
    if mariadb:
        return {"resize the buffer pool": ("SUPER",),
                "kill other users' statements": ("CONNECTION ADMIN", "SUPER"),
                "see all sessions": ("PROCESS",)}
    return {"resize the buffer pool": ("SYSTEM_VARIABLES_ADMIN", "SUPER"),
            "kill other users' statements": ("CONNECTION_ADMIN", "SUPER"),
            "see all sessions": ("PROCESS",)}


def missing_grants(grants: Grants, mariadb: bool) -> list[str]:
    return [f"{what}: {' or '.join(privs)}" for what, privs in needed_grants(mariadb).items()
            if not grants.has(*privs)]
