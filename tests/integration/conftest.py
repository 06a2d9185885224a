from __future__ import annotations

import subprocess
from typing import Iterator

import pytest


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A live process to point act/ and sense/ at (killed and reaped after the test)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()
