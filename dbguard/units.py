"""Sizes and thresholds as a DBA writes them ("512MiB", "2x kill.min_rss"), and TOML key names.

Shared by the config schema (dbguard.config) and the policy rules (dbguard.rules), so
neither needs the other to read a number.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: Any, path: str = "size") -> int:
    """Bytes from an int or a string such as "512MiB" (kB/MB/GB are binary, as in PostgreSQL)."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a size such as 512MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{path}: must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{path}: expected a size such as 512MiB or a number of bytes, got {value!r}")



# Named thresholds a rule can take a multiple of. "limit" is the watched memory cgroup's
# limit (a rule using it never matches while there is none, e.g. when watching the host).
THRESHOLDS = ("kill.min_rss", "limit")
_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[x*]\s*([a-z_.]+)\s*$")


@dataclass(frozen=True)
class Threshold:
    """rss_above: a fixed size, or `factor` times the named threshold `name`."""

    text: str
    size: int | None = None
    factor: float = 0.0
    name: str = ""

    def resolve(self, named: Mapping[str, int | None]) -> int | None:
        if self.size is not None:
            return self.size
        base = named.get(self.name)
        return None if base is None else int(self.factor * base)


def parse_threshold(text: str, path: str) -> Threshold:
    m = _MULTIPLE.match(text)
    if m:
        if m.group(2) not in THRESHOLDS:
            raise ConfigError(f"{path}: unknown threshold {m.group(2)!r}; use one of {', '.join(THRESHOLDS)} "
                              f'(e.g. "2x kill.min_rss")')
        return Threshold(text.strip(), factor=float(m.group(1)), name=m.group(2))
    try:
        return Threshold(text.strip(), size=parse_size(text, path))
    except ConfigError:
        raise ConfigError(f'{path}: expected a size such as "2GiB" or a multiple such as "2x kill.min_rss", '
                          f"got {text!r}") from None


def toml_key(key: str) -> str:
    """A key as it is written in TOML: bare when it can be, else quoted ("/tenants/free/*")."""
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else json.dumps(key)
