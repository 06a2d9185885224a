"""The check of the Python mirror (dbguard.kernel.layout) against a loaded map's sizes and
the compiled C's field names: pure logic on the kernel's MapInfo."""
from __future__ import annotations

import ctypes as ct
from types import SimpleNamespace

import pytest

from dbguard.kernel import layout
from dbguard.kernel.maps import HASH, RINGBUF, MapInfo, check


def mapped(key, leaf, key_size, value_size, kind=HASH):
    return SimpleNamespace(Key=key, Leaf=leaf, info=MapInfo(type=kind, key_size=key_size, value_size=value_size))


def test_agreeing_mirror_passes():
    names = [f[0] for f in layout.Proc._fields_]
    check("procs", mapped(ct.c_uint32, layout.Proc, 4, ct.sizeof(layout.Proc)), None, names)


def test_a_value_size_drift_names_the_map_and_both_sizes():
    with pytest.raises(ValueError, match=r"BPF map procs: value is 40 bytes in the kernel, 32 in"):
        check("procs", mapped(ct.c_uint32, layout.Proc, 4, 40), None, None)


def test_a_renamed_field_is_refused():
    names = [f[0] for f in layout.Streak._fields_][::-1]
    with pytest.raises(ValueError, match="value fields are"):
        check("streaks", mapped(ct.c_uint32, layout.Streak, 4, ct.sizeof(layout.Streak)), None, names)


def test_a_key_size_drift_is_refused():
    with pytest.raises(ValueError, match="key is 8 bytes in the kernel, 4 in"):
        check("procs", mapped(ct.c_uint32, layout.Proc, 8, ct.sizeof(layout.Proc)), None, None)


def test_event_maps_have_no_value_to_check():
    check("events", mapped(ct.c_int, ct.c_int, 0, 0, RINGBUF), None, None)
