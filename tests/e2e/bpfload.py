"""Loading dbguard's BPF programs in the end-to-end tests: compiled, or from the compile cache."""
from __future__ import annotations

import pytest

from dbguard.errors import DbguardError
from dbguard.kernel.loader import FROM_CACHE

__all__ = ["FROM_CACHE", "KEPT", "load_guard", "load_cached_guard"]

KEPT = "kept in "


def load_guard(request, **kw):
    """BpfGuard.load(**kw), or the module fails saying why BPF is not usable here."""
    from dbguard.kernel.bpf import BpfGuard, availability
    usable, why = availability()
    if not usable:
        pytest.fail(f"{request.module.__name__} needs BPF here: {why}", pytrace=False)
    try:
        return BpfGuard.load(**kw)
    except DbguardError as e:
        pytest.fail(f"{request.module.__name__} could not load the BPF programs: {e}", pytrace=False)


def load_cached_guard(request, cache_dir: str):
    """The programs compiled once into `cache_dir`, then loaded from there as a restart does
    (dbguard.kernel.objcache): a guard whose programs no compiler made in this load."""
    first = load_guard(request, cache_dir=cache_dir)
    try:
        assert KEPT in first.cache_note, first.cache_note
    finally:
        first.close()
    g = load_guard(request, cache_dir=cache_dir)
    if not g.from_cache:
        g.close()
        pytest.fail(f"the second load did not use the compile cache: {g.cache_note}", pytrace=False)
    return g
