"""What the kernel's memory files say, parsed: PSI, memory.stat and memory.events (flat
keyed), /proc/meminfo, limits, and the arithmetic of PSI triggers. Pure: text in, numbers
out (tests/unit/test_pressure_parse.py); sense/pressure.py and sense/scope.py read the files.
"""
from __future__ import annotations

PROC_PSI_MEMORY = "/proc/pressure/memory"
PROC_PSI_IO = "/proc/pressure/io"
MEMINFO = "/proc/meminfo"
UNLIMITED = 1 << 62            # v1 reports "no limit" as a page-rounded 2^63-1
UNPRIVILEGED_WINDOW_US = 2_000_000


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """/proc/pressure/memory or memory.pressure -> {"some": {"avg10": .., "total": ..}, "full": {..}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if not rest:
            continue
        values = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            values[key] = float(value)
        out[kind] = values
    return out


def psi_avg10(text: str) -> tuple[float, float]:
    """(some avg10, full avg10) in percent; a kernel without a "full" line reports 0 for it."""
    psi = parse_psi(text)
    return psi.get("some", {}).get("avg10", 0.0), psi.get("full", {}).get("avg10", 0.0)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """memory.stat (v1 and v2): "key value" per line."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


# memory.events counters that say the cgroup reached its hard limit or ran out: news a cycle must
# see at once. The rest ("low", "high") count reclaim and throttling, which a cgroup held at its
# memory.high does dozens of times a second (the kernel notifies at most every 20 ms).
LIMIT_EVENTS = ("max", "oom", "oom_kill", "oom_group_kill")


def limit_event_kind(before: dict[str, int], after: dict[str, int]) -> str:
    """What a change of memory.events from `before` to `after` says: "limit" when a counter of
    LIMIT_EVENTS rose (or the file could not be compared), "high" when only the throttling or
    protection counters did (high, low), "" when none did. The kernel defers a notification
    that comes within 20 ms of the last one and sends it later, when the read that answered the
    first may already have seen its count: nothing new, and not a wake-up."""
    if not before or not after:
        return "limit"
    rose = {k for k, v in after.items() if v > before.get(k, 0)}
    if rose & set(LIMIT_EVENTS):
        return "limit"
    return "high" if rose else ""


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes ("MemTotal:  24684544 kB" -> 25276973056)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def parse_limit(text: str, mem_total: int) -> int | None:
    """A cgroup limit in bytes, or None when it does not limit anything ("max", 2^63, >= RAM)."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    if value >= UNLIMITED or value >= mem_total:
        return None
    return value


def reclaimable_from_stat(stat: dict[str, int], version: int) -> int:
    """Page cache the kernel can drop without I/O stalls: the inactive file list, less the
    pages that are dirty or under writeback.

    Active file pages are reclaimable too, but only after they age; counting them would call
    a cgroup safe that is about to thrash. Dirty and writeback pages must be written first:
    a hog cannot wait for that (a database's sort or hash spilling to temporary files fills
    the cgroup with exactly such pages), and the stall they cause shows as IO pressure, not
    memory pressure. Dirty pages may sit on either LRU list; taking them all off the inactive
    one errs on the side of seeing pressure.
    """
    if version == 1:
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        unwritten = stat.get("total_dirty", stat.get("dirty", 0)) + stat.get("total_writeback",
                                                                               stat.get("writeback", 0))
    else:
        inactive = stat.get("inactive_file", 0)
        unwritten = stat.get("file_dirty", 0) + stat.get("file_writeback", 0)
    return max(0, inactive - unwritten)


def trigger_line(stall_us: int, window_us: int) -> bytes:
    return f"some {stall_us} {window_us}".encode() + b"\0"


def unprivileged_window(window_us: int) -> int:
    """Without CAP_SYS_RESOURCE the kernel takes only windows in whole multiples of 2 s."""
    return -(-window_us // UNPRIVILEGED_WINDOW_US) * UNPRIVILEGED_WINDOW_US


def psi_some_total(text: str) -> int | None:
    """Cumulative "some" stall in microseconds, or None when the text has no "some" line."""
    total = parse_psi(text).get("some", {}).get("total")
    return None if total is None else int(total)


def trigger_is_genuine(samples: list[tuple[float, int]], now: float, total_us: int,
                       stall_us: int, horizon: float) -> bool:
    """Whether a PSI trigger event is backed by at least `stall_us` of stall lately.

    `samples` are (monotonic time, some total) taken before, oldest first. The reference is
    the newest sample at least `horizon` seconds old (so it predates the kernel's window),
    or the oldest one we have. Measured on Linux 6.18: a fresh unprivileged trigger starts
    its window from the wrong aggregator's total and fires on the first few microseconds
    of stall (500 ms threshold, 2.3 ms of stall); this check drops such events.
    """
    if not samples:
        return True
    ref = samples[0][1]
    for t, total in samples:
        if t <= now - horizon:
            ref = total
        else:
            break
    return total_us - ref >= stall_us
