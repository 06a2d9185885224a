"""The [[caches]] and [[poolers]] tables (dbguard.config reads them like every other table)."""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import Bounded, Size, read_password


@dataclass(frozen=True)
class CacheConfig:
    """One [[caches]] table: an application cache (Redis/Valkey, memcached) that gives memory back."""

    kind: str = ""
    name: str = ""
    url: str = ""                      # redis://host:port, unix:///path; memcached: host:port or /path
    password_file: str = ""
    password_env: str = ""
    floor: int = Size(64 * 1024**2)
    shrink_steps: int = Bounded(3, 0, 16)
    timeout: float = Bounded(1.0, 0.1, 30)

    def password(self) -> str | None:
        return read_password(self.password_env, self.password_file, f"caches.{self.name}")


@dataclass(frozen=True)
class PoolerConfig:
    """One [[poolers]] table: a connection pooler whose pool sizes go down while sessions press."""

    kind: str = ""
    name: str = ""
    dsn: str = ""                      # its admin console, e.g. "host=/run/pgbouncer port=6432 dbname=pgbouncer"
    password_file: str = ""
    password_env: str = ""
    pool_floor: int = Bounded(1, 1, 100_000)
    shrink_steps: int = Bounded(3, 0, 16)
    timeout: float = Bounded(2.0, 0.1, 30)

    def password(self) -> str | None:
        return read_password(self.password_env, self.password_file, f"poolers.{self.name}")
