"""Facts about the host dbguard runs on that decide what it can do: capabilities, users,
locked memory, and telling systemd how it is doing."""
from __future__ import annotations

import ctypes
import os
import socket

from .sense.procfs import PAGE_SIZE
from .settings import Config
from .validate import uid_of

CAP_SYS_RESOURCE = 24
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
M_ARENA_MAX = -8        # glibc's mallopt parameter (malloc.h)
_libc: ctypes.CDLL | None = None


def cap_eff(status_path: str = "/proc/self/status") -> int:
    """The effective capability set, as the bit mask in /proc/self/status."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_capability(bit: int) -> bool:
    return bool(cap_eff() >> bit & 1)


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def one_malloc_arena() -> None:
    """All of dbguard's threads allocate from glibc's main arena. A thread's own arena (the
    bounded SQL calls' worker, the metrics server's) is locked with the rest by lock_memory, and
    trim_heap can give back only the main arena's pages; these threads allocate little and
    seldom, so sharing one arena costs them nothing. Called before any thread starts: an arena
    a thread already has stays its own."""
    try:
        mallopt = _c().mallopt
    except AttributeError:      # not glibc: no arenas of this kind
        return
    mallopt(M_ARENA_MAX, 1)


def lock_memory() -> str:
    """mlockall so dbguard never waits on reclaim itself; ONFAULT locks only pages it touches."""
    global _locked
    if _c().mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        return f"memory not locked: mlockall failed ({os.strerror(ctypes.get_errno())}); needs CAP_IPC_LOCK"
    _locked = True
    return "memory locked (mlockall, on fault)"


_locked = False
MLOCK_ONFAULT = 1
# Trim again only once this much anonymous memory has come since the last trim left it: the
# unlock and relock walk the whole heap (~1.3 ms for 10 MiB), every rest cycle otherwise. Small:
# at 256 KiB a cycle's transients (a 5,000-entry dict is 147 KiB) stayed, +0.4 MiB RSS steady.
TRIM_GROWTH = 64 * 1024
_trimmed_to = 0


def _anon_bytes() -> int:
    """Resident memory not backed by a file (statm's resident - shared; one small read)."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE_SIZE


def heap_range(maps: str = "/proc/self/maps") -> tuple[int, int] | None:
    """(start, length) of the process's [heap] (glibc's main arena), None without one."""
    with open(maps, "rb") as f:
        for line in f:
            if line.rstrip().endswith(b"[heap]"):
                lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split(b"-"))
                return lo, hi - lo
    return None


def trim_heap() -> None:
    """Free heap pages back to the kernel (glibc's malloc_trim). A cycle's transient tables
    (5,000 processes: dicts of ~150 KiB) leave freed chunks between live ones that malloc keeps
    resident. The kernel discards no page of a locked range (madvise gives EINVAL), so once
    lock_memory has locked everything, the heap is unlocked for the trim and locked again on
    fault after it: no page is faulted in by that, and none is unlocked for longer than the call.
    At rest only (under pressure the next cycle would fault them in again), and only once the
    anonymous memory has grown TRIM_GROWTH since the last trim."""
    global _trimmed_to
    if _anon_bytes() < _trimmed_to + TRIM_GROWTH:
        return
    try:
        libc = _c()
        trim = libc.malloc_trim
    except AttributeError:      # not glibc (musl has no malloc_trim): nothing to give back this way
        return
    heap = heap_range() if _locked else None
    if heap is None:
        trim(0)
    else:
        libc.munlock(ctypes.c_void_p(heap[0]), ctypes.c_size_t(heap[1]))
        try:
            trim(0)
        finally:
            # Trimming may have lowered the break: lock what the heap is now.
            heap = heap_range() or heap
            libc.mlock2(ctypes.c_void_p(heap[0]), ctypes.c_size_t(heap[1]), MLOCK_ONFAULT)
    _trimmed_to = _anon_bytes()


def resolve_users(names: tuple[str, ...]) -> frozenset[int]:
    """kill.protect_users as uids (the validator has refused names this host does not know)."""
    return frozenset(uid for uid in map(uid_of, names) if uid is not None)


def resolve_rule_users(cfg: Config) -> dict[str, int]:
    """User names in [[policy.rules]] -> uid (the validator has refused unknown ones)."""
    return {name: uid for rule in cfg.policy.rules for name in rule.user
            if not name.isdigit() and (uid := uid_of(name)) is not None}


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify, WatchdogSec) how we are: "READY=1", "WATCHDOG=1", "STOPPING=1".

    A no-op outside systemd. Never raises: a notification that cannot be sent must not stop
    protection (systemd then restarts a unit whose watchdog starves, which is the point)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half the unit's WatchdogSec in seconds (how often to feed it), None when not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
