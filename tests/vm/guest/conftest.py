"""Inside the test VM: every test here is about a real cgroup v2 host, so the suite fails at
once, saying so, anywhere else."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def cgroup_v2_host() -> None:
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if not controllers.exists() or "memory" not in controllers.read_text().split():
        pytest.fail("tests/vm/guest needs a cgroup v2 host with the memory controller: run them "
                    "through tests/vm/test_vm.py (make vm-test), which boots the test VM", pytrace=False)
