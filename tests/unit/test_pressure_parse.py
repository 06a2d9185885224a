"""Pure parsers of dbguard.sense.pressure on text as the kernel writes it."""
from __future__ import annotations

import pytest

from dbguard.sense import memtext as p

PSI = """some avg10=12.34 avg60=1.86 avg300=0.85 total=3367353
full avg10=0.28 avg60=0.76 avg300=0.33 total=1449693
"""

# An old kernel (before 5.13 for cpu, some builds for memory) may print only "some".
PSI_SOME_ONLY = "some avg10=3.00 avg60=2.00 avg300=1.00 total=10\n"

V1_STAT = """cache 974848
rss 1769472
inactive_file 753664
active_file 221184
hierarchical_memory_limit 209715200
hierarchical_memsw_limit 9223372036854771712
total_cache 104857600
total_inactive_file 94371840
total_active_file 10485760
"""

V2_STAT = """anon 1769472
file 104857600
kernel 2236416
inactive_file 94371840
active_file 10485760
pgfault 33181
"""

MEMINFO = """MemTotal:       24684084 kB
MemFree:        23640012 kB
MemAvailable:   23971904 kB
Buffers:            5256 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

MEM_TOTAL = 24684084 * 1024


def test_parse_psi():
    psi = p.parse_psi(PSI)
    assert psi["some"] == {"avg10": 12.34, "avg60": 1.86, "avg300": 0.85, "total": 3367353}
    assert psi["full"]["total"] == 1449693
    assert p.psi_avg10(PSI) == (12.34, 0.28)
    assert p.psi_avg10(PSI_SOME_ONLY) == (3.0, 0.0)
    assert p.psi_avg10("") == (0.0, 0.0)


def test_parse_memory_stat_and_reclaimable():
    v1 = p.parse_flat_keyed(V1_STAT)
    assert v1["hierarchical_memory_limit"] == 209715200
    # v1: the hierarchical (total_) figure, which counts child cgroups too
    assert p.reclaimable_from_stat(v1, 1) == 94371840
    assert p.reclaimable_from_stat({"inactive_file": 5}, 1) == 5
    v2 = p.parse_flat_keyed(V2_STAT)
    assert p.reclaimable_from_stat(v2, 2) == 94371840
    assert p.reclaimable_from_stat({}, 2) == 0


def test_parse_meminfo_bytes():
    info = p.parse_meminfo(MEMINFO)
    assert info["MemTotal"] == MEM_TOTAL
    assert info["MemAvailable"] == 23971904 * 1024
    assert info["HugePages_Total"] == 0              # a count, not kB


@pytest.mark.parametrize("text, expected", [
    ("209715200\n", 209715200),
    ("9223372036854771712\n", None),     # v1 "unlimited"
    ("max\n", None),                     # v2 "unlimited"
    (str(1 << 62), None),
    (str(MEM_TOTAL), None),              # a limit the size of RAM limits nothing
    (str(MEM_TOTAL - 4096), MEM_TOTAL - 4096),
])
def test_parse_limit(text, expected):
    assert p.parse_limit(text, MEM_TOTAL) == expected


def test_trigger_line_and_unprivileged_window():
    assert p.trigger_line(50000, 1000000) == b"some 50000 1000000\0"
    assert p.unprivileged_window(1_000_000) == 2_000_000
    assert p.unprivileged_window(2_000_000) == 2_000_000
    assert p.unprivileged_window(2_500_000) == 4_000_000
    assert p.unprivileged_window(10_000_000) == 10_000_000


def test_psi_some_total():
    assert p.psi_some_total(PSI) == 3367353
    assert p.psi_some_total("") is None


def test_trigger_is_genuine():
    stall = 50_000
    # Samples every second; horizon 6 s.
    samples = [(100.0 + i, 1_000_000 + i * 1_000) for i in range(10)]     # 1 ms of stall per second
    now = 110.0
    # Reference: the newest sample at least 6 s old (t=104, total 1_004_000).
    assert not p.trigger_is_genuine(samples, now, 1_010_000, stall, 6.0)    # 6 ms: the kernel bug
    assert p.trigger_is_genuine(samples, now, 1_054_000, stall, 6.0)        # exactly the threshold
    # Younger than the horizon: the oldest sample (the trigger's creation) is the reference.
    assert p.trigger_is_genuine(samples[:3], 102.5, 1_051_000, stall, 6.0)
    assert not p.trigger_is_genuine(samples[:3], 102.5, 1_049_000, stall, 6.0)
    # Nothing to compare with: believe the kernel.
    assert p.trigger_is_genuine([], now, 0, stall, 6.0)


def test_dirty_and_writeback_pages_are_not_reclaimable():
    # memory.stat as a cgroup shows it while a sort spills to temporary files: 692 MiB of
    # inactive file pages, of which 500 MiB dirty and 100 MiB under writeback.
    MiB = 1024 * 1024
    v1 = {"total_inactive_file": 692 * MiB, "total_dirty": 500 * MiB, "total_writeback": 100 * MiB}
    assert p.reclaimable_from_stat(v1, 1) == 92 * MiB
    v2 = {"inactive_file": 692 * MiB, "file_dirty": 500 * MiB, "file_writeback": 100 * MiB}
    assert p.reclaimable_from_stat(v2, 2) == 92 * MiB
    # Dirty pages on the active list as well: never below zero.
    assert p.reclaimable_from_stat({"total_inactive_file": 10, "total_dirty": 50}, 1) == 0
