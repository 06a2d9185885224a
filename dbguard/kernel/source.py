"""The BPF C exactly as it is loaded: dbguard/bpf/dbguard.h inlined, sizes and kernel features defined.

Features are read from the tracepoint format files, and the few kernel struct fields the
programs read have their offsets from the running kernel's BTF (dbguard.kernel.btf), never
from the installed headers, so one source compiles against whatever headers BCC finds."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from . import btf, kfuncs, layout

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# (category, event) each program attaches to
TRACEPOINTS = (
    ("task", "task_newtask"),
    ("sched", "sched_process_exec"),
    ("sched", "sched_process_exit"),
    ("vmscan", "mm_vmscan_memcg_reclaim_begin"),
    ("vmscan", "mm_vmscan_memcg_reclaim_end"),
    ("vmscan", "mm_vmscan_direct_reclaim_begin"),
    ("vmscan", "mm_vmscan_direct_reclaim_end"),
    ("oom", "mark_victim"),
    ("oom", "oom_score_adj_update"),
)

DEFAULT_SIZES = {"max_procs": 16384, "max_cgroups": 1024, "event_pages": 8, "max_exes": 256,
                 "max_streaks": 4096}


def tracefs() -> Path | None:
    for p in TRACEFS_CANDIDATES:
        if (p / "events").is_dir():
            return p
    return None


def tracepoint_fields(category: str, event: str) -> set[str] | None:
    """Field names of a tracepoint, or None when it does not exist (or tracefs is not mounted)."""
    root = tracefs()
    if root is None:
        return None
    try:
        text = (root / "events" / category / event / "format").read_text()
    except OSError:
        return None
    return set(re.findall(r"field:[^;]*?(\w+)(?:\[\d*\])?;", text))


def kernel_has_ringbuf(release: str | None = None) -> bool:
    """BPF ring buffers came with Linux 5.8."""
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (5, 8)


def feature_defines() -> dict[str, int]:
    out = {}
    if kernel_has_ringbuf():
        out["DBG_RINGBUF"] = 1
    if "group_dead" in (tracepoint_fields("sched", "sched_process_exit") or ()):
        out["DBG_HAVE_GROUP_DEAD"] = 1
    if {"anon_rss", "file_rss", "shmem_rss", "oom_score_adj"} <= (tracepoint_fields("oom", "mark_victim") or set()):
        out["DBG_HAVE_VICTIM_RSS"] = 1
    return out


def _pow2_pages(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def program_source(offsets: dict[str, int] | None = None, kfunc_ids: dict[str, int] | None = None,
                   **sizes: int) -> str:
    """The C exactly as BpfGuard.load compiles it. Sizes: max_procs, max_cgroups, event_pages,
    max_exes, max_streaks. Kernel struct offsets and kfunc ids: the running kernel's
    (btf.kernel_offsets, btf.kernel_kfuncs), unless given ({} for no kfuncs); a kernel without
    BTF raises btf.BtfError."""
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown sizes: {', '.join(sorted(unknown))}")
    s = {**DEFAULT_SIZES, **sizes}
    defines = {
        "DBG_MAX_PROCS": max(1, int(s["max_procs"])),
        "DBG_MAX_CGROUPS": max(1, int(s["max_cgroups"])),
        "DBG_EVENT_PAGES": _pow2_pages(s["event_pages"]),   # ring buffers need a power of two
        "DBG_MAX_EXES": max(1, int(s["max_exes"])),
        "DBG_MAX_STREAKS": max(1, int(s["max_streaks"])),
        **feature_defines(),
        **(offsets if offsets is not None else btf.kernel_offsets()),
        **kfuncs.defines(kfunc_ids if kfunc_ids is not None else btf.kernel_kfuncs()),
    }
    parts = ["/* dbguard BPF programs, as loaded by dbguard.kernel.bpf (BCC). */"]
    parts += [f"#define {k} {v}" for k, v in defines.items()]
    parts.append(layout.HEADER.read_text())
    include = re.compile(r'^#include "dbguard.h"\n', re.M)
    for name in layout.SOURCES:
        parts.append(f"/* ---- bpf/{name} ---- */")
        parts.append(include.sub("", (layout.BPF_DIR / name).read_text()))
    return "\n".join(parts)


def headers_available() -> str | None:
    """Where BCC will find kernel headers, or None."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and Path(env).is_dir():
        return env
    build = Path("/lib/modules") / platform.release() / "build"
    if (build / "include").is_dir():
        return str(build)
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return "/sys/kernel/kheaders.tar.xz"
    return None
