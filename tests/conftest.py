"""Suite-wide rules: a test that needs root fails (never skips) when it cannot have it."""
from __future__ import annotations

import os

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("needs root (memory cgroups, BPF, starting databases): run the suite as root, "
                    "e.g. sudo make test", pytrace=False)
