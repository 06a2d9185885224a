"""The one Python mirror of dbguard/bpf/dbguard.h: its constants (parsed from the header, so they
cannot drift) and its structs as ctypes (checked against BCC's own view in the e2e tests)."""
from __future__ import annotations

import ctypes as ct
import os
import re
from pathlib import Path

# Shipped inside the package (wheel and .deb alike); DBGUARD_BPF_DIR points at a working copy.
BPF_DIR = Path(os.environ.get("DBGUARD_BPF_DIR") or Path(__file__).resolve().parents[1] / "bpf")
HEADER = BPF_DIR / "dbguard.h"
# Concatenated in this order after the header: maps first, then one file per concern.
SOURCES = ("maps.c", "cancel.c", "reclaim.c", "fork.c", "oom.c")

_DEFINE = re.compile(r"^#define\s+(DBG_\w+)\s+\(?(-?(?:0x[0-9a-fA-F]+|\d+))\)?", re.M)


def _constants() -> dict[str, int]:
    return {name: int(val, 0) for name, val in _DEFINE.findall(HEADER.read_text())}


C = _constants()

SHIELD = C["DBG_SHIELD"]
INHERIT = C["DBG_INHERIT"]
INHERITED = C["DBG_INHERITED"]
CANDIDATE = C["DBG_CANDIDATE"]
FRESH = C["DBG_FRESH"]
CANCEL = C["DBG_CANCEL"]
EVF_UNLISTED = C["DBG_EVF_UNLISTED"]
EVF_EXEC = C["DBG_EVF_EXEC"]
SCOPE_NONE, SCOPE_CGROUP, SCOPE_ALL = C["DBG_SCOPE_NONE"], C["DBG_SCOPE_CGROUP"], C["DBG_SCOPE_ALL"]
SCOPE_SET, MAX_SCOPES, SCOPE_DEPTH = C["DBG_SCOPE_SET"], C["DBG_MAX_SCOPES"], C["DBG_SCOPE_DEPTH"]
SCOPE_HOST = C["DBG_SCOPE_HOST"]
NSEC_PER_TICK = C["DBG_NSEC_PER_TICK"]
EVF_KILLED = C["DBG_EVF_KILLED"]
EVF_CANDIDATE = C["DBG_EVF_CANDIDATE"]
EVF_BY_CGROUP = C["DBG_EVF_BY_CGROUP"]
EVF_FOR_OTHER = C["DBG_EVF_FOR_OTHER"]
EVF_AT_LIMIT = C["DBG_EVF_AT_LIMIT"]
ACTION_NONE = C["DBG_ACTION_NONE"]
ACTION_KILL = C["DBG_ACTION_KILL"]
ACTION_SHIELD = C["DBG_ACTION_SHIELD"]
SCORE_UNKNOWN = C["DBG_SCORE_UNKNOWN"]
VICTIM_SLOTS, LISTED_VICTIMS = C["DBG_VICTIM_SLOTS"], C["DBG_LISTED_VICTIMS"]

EVENT_KINDS = {
    C["DBG_EV_KILL"]: "kill",
    C["DBG_EV_WOULD_KILL"]: "would_kill",
    C["DBG_EV_OOM_VICTIM"]: "oom_victim",
    C["DBG_EV_BREACH"]: "breach",
    C["DBG_EV_SCORE_TAMPER"]: "score_tamper",
    C["DBG_EV_BIRTH"]: "birth",
    C["DBG_EV_RECLAIM_FAIL"]: "reclaim_fail",
    C["DBG_EV_CANCEL"]: "cancel",
    C["DBG_EV_WOULD_CANCEL"]: "would_cancel",
}

# counters[] index -> metric-friendly name
COUNTERS = {v: k[len("DBG_CTR_"):].lower() for k, v in C.items() if k.startswith("DBG_CTR_")}
NR_COUNTERS = C["DBG_NR_COUNTERS"]


class Proc(ct.Structure):
    _fields_ = [("flags", ct.c_uint32), ("tier", ct.c_uint32), ("cand_tier", ct.c_uint32),
                ("origin", ct.c_uint32), ("score", ct.c_int32), ("pad", ct.c_uint32),
                ("start", ct.c_uint64)]


class Streak(ct.Structure):
    _fields_ = [("first_ns", ct.c_uint64), ("last_ns", ct.c_uint64), ("fails", ct.c_uint32),
                ("reported", ct.c_uint32)]


class Victim(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("flags", ct.c_uint32), ("start", ct.c_uint64),
                ("anon_pages", ct.c_uint64), ("seen_ns", ct.c_uint64), ("tier", ct.c_uint32),
                ("pad", ct.c_uint32), ("scope", ct.c_uint64), ("comm", ct.c_char * 16)]


class Scope(ct.Structure):
    _fields_ = [("depth", ct.c_uint32), ("level", ct.c_uint32)]


class Exe(ct.Structure):
    _fields_ = [("ino", ct.c_uint64), ("dev", ct.c_uint64)]


class Cgroup(ct.Structure):
    _fields_ = [("tier", ct.c_uint32), ("action", ct.c_uint32),
                ("fails", ct.c_uint32), ("reported", ct.c_uint32)]


class Policy(ct.Structure):
    _fields_ = [("level", ct.c_uint32), ("enabled", ct.c_uint32), ("dry_run", ct.c_uint32),
                ("min_level_to_kill", ct.c_uint32), ("fail_streak", ct.c_uint32),
                ("fail_pages", ct.c_uint32), ("self_tgid", ct.c_uint32), ("n_cgroups", ct.c_uint32),
                ("early_streak", ct.c_uint32), ("scope", ct.c_uint32), ("scope_level", ct.c_uint32),
                ("births", ct.c_uint32), ("scope_id", ct.c_uint64), ("min_anon_pages", ct.c_uint64),
                ("cancel_gap_ns", ct.c_uint64), ("cancel_streak", ct.c_uint32), ("cancel_pages", ct.c_uint32),
                ("cancel_level", ct.c_uint32), ("pad", ct.c_uint32)]


class Event(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64), ("a", ct.c_uint64),
                ("b", ct.c_uint64), ("kind", ct.c_uint32), ("pid", ct.c_uint32),
                ("tgid", ct.c_uint32), ("level", ct.c_uint32), ("flags", ct.c_uint32),
                ("tier", ct.c_uint32), ("by_pid", ct.c_uint32), ("c", ct.c_int32),
                ("comm", ct.c_char * 16), ("by_comm", ct.c_char * 16), ("start", ct.c_uint64),
                ("pages", ct.c_uint64)]


# map name in the C source -> the ctypes type of its keys and of its values (per CPU for a
# per-CPU map); a map not named here is read as raw bytes of the kernel's sizes.
MAP_KEYS = {"procs": ct.c_uint32, "cgroups": ct.c_uint64, "exes": Exe, "scopes": ct.c_uint64,
            "streaks": ct.c_uint32, "policy": ct.c_int, "counters": ct.c_int, "last_wake": ct.c_int,
            "reclaim_jump": ct.c_int, "events": ct.c_int, "last_cancel": ct.c_int, "victims": ct.c_int}
MAP_VALUES = {"procs": Proc, "cgroups": Cgroup, "exes": ct.c_uint32, "scopes": Scope, "streaks": Streak,
              "policy": Policy, "counters": ct.c_uint64, "last_wake": ct.c_uint64, "reclaim_jump": ct.c_int,
              "events": ct.c_int, "last_cancel": ct.c_uint64, "victims": Victim}
