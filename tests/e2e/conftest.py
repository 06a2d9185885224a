"""Fixtures of the end-to-end tests: the BPF programs, loaded once per module."""
from __future__ import annotations

from typing import Iterator

import pytest

from bpfload import load_guard


@pytest.fixture(scope="module")
def bpf_guard(request) -> Iterator:
    """dbguard's BPF programs loaded into the running kernel (dbguard.kernel.bpf.BpfGuard),
    closed at the end of the module; the module fails saying why when BPF is not usable here."""
    g = load_guard(request)
    try:
        yield g
    finally:
        g.close()
