"""Fixtures of the end-to-end tests: the BPF programs, loaded once per module."""
from __future__ import annotations

from typing import Iterator

import pytest

from dbguard.errors import DbguardError


@pytest.fixture(scope="module")
def bpf_guard(request) -> Iterator:
    """dbguard's BPF programs loaded into the running kernel (dbguard.kernel.bpf.BpfGuard),
    closed at the end of the module; the module fails saying why when BPF is not usable here."""
    from dbguard.kernel.bpf import BpfGuard, availability
    usable, why = availability()
    if not usable:
        pytest.fail(f"{request.module.__name__} needs BPF here: {why}", pytrace=False)
    try:
        g = BpfGuard.load()
    except DbguardError as e:
        pytest.fail(f"{request.module.__name__} could not load the BPF programs: {e}", pytrace=False)
    try:
        yield g
    finally:
        g.close()
