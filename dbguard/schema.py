"""What the config tables share: fields with bounds or sizes, and how a password is read."""
from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def Size(default: int, **kw) -> Any:
    return field(default=default, metadata={"size": True, **kw})


def Bounded(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"lo": lo, "hi": hi})


def read_password(env: str, file: str, where: str) -> str | None:
    """The password from an environment variable or the first line of a file, read when it is
    needed (never kept in a config object, never logged); None when neither is set."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}.password_env: environment variable {env} is not set")
        return value
    if file:
        try:
            return Path(file).read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise ConfigError(f"{where}.password_file: cannot read {file}: "
                              f"{getattr(e, 'strerror', None) or 'empty file'}") from None
    return None
