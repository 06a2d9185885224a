"""Sizes and thresholds as a DBA writes them ("512MiB", "2x kill.min_rss"), and TOML key names.

Shared by the config schema (dbguard.config) and the policy rules (dbguard.rules), so
neither needs the other to read a number.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError
from .escape import shown

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
# No memory is larger; also keeps every size inside the kernel's u64 (BPF maps, cgroup files).
MAX_BYTES = 1 << 60
MAX_FACTOR = 1_000_000


def parse_size(value: Any, path: str = "size") -> int:
    """Bytes from an int or a string such as "512MiB" (kB/MB/GB are binary, as in PostgreSQL)."""
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a size such as 512MiB, got {value!r}")
    n: int | None = None
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{path}: must not be negative")
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS and len(m.group(1)) > 40:
            n = MAX_BYTES + 1       # past any memory (and past int()'s 4300-digit limit)
        elif m and m.group(2).lower() in _UNITS:
            # Exact integer arithmetic: a float would turn 400 digits into inf, then OverflowError.
            whole, _, frac = m.group(1).partition(".")
            unit = _UNITS[m.group(2).lower()]
            n = int(whole) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
    if n is None:
        raise ConfigError(f"{path}: expected a size such as 512MiB or a number of bytes, got {shown(value)}")
    if n > MAX_BYTES:
        raise ConfigError(f"{path}: {shown(value)} is larger than any memory (at most 1 EiB)")
    return n


def finite(value: float, path: str) -> float:
    """TOML has nan and inf; no setting of dbguard means either (nan compares false to every bound)."""
    if not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value!r}")
    return value



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
            raise ConfigError(f"{path}: unknown threshold {shown(m.group(2))}; use one of {', '.join(THRESHOLDS)} "
                              f'(e.g. "2x kill.min_rss")')
        factor = float(m.group(1))
        if factor > MAX_FACTOR:
            raise ConfigError(f"{path}: factor {m.group(1)[:20]} is too large (at most {MAX_FACTOR})")
        return Threshold(text.strip(), factor=factor, name=m.group(2))
    try:
        return Threshold(text.strip(), size=parse_size(text, path))
    except ConfigError:
        raise ConfigError(f'{path}: expected a size such as "2GiB" or a multiple such as "2x kill.min_rss", '
                          f"got {shown(text)}") from None


def toml_key(key: str) -> str:
    """A key as it is written in TOML: bare when it can be, else quoted ("/tenants/free/*")."""
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else json.dumps(key)
