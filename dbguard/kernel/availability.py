"""Whether dbguard's BPF programs can be used on this host, said in one line with the fix when
not (cheap checks: nothing is compiled, BCC is found and not imported), and what the BPF path
adds for `dbguard check`."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from ..host import cap_eff
from .maps import libbpf
from .source import TRACEPOINTS, headers_available, kernel_has_ringbuf, tracefs, tracepoint_fields

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
OFF_HINT = "or set [bpf] enabled = false to run on the user-space path alone"


def availability() -> tuple[bool, str]:
    """(usable, one line): cheap checks only, nothing is compiled."""
    caps = cap_eff()
    if not (caps >> CAP_SYS_ADMIN & 1 or (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1)):
        return False, ("BPF unavailable: no CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN); "
                       "run dbguard as root or grant those capabilities")
    # Found, not imported: importing bcc maps libbcc and LLVM into this process.
    if importlib.util.find_spec("bcc") is None:
        return False, ("BPF unavailable: the BCC Python module is missing; apt-get install "
                       "python3-bpfcc and make the venv with --system-site-packages")
    try:
        libbpf()
    except OSError:
        return False, ("BPF unavailable: libbpf.so.1 is missing (the daemon reads the maps through it); "
                       "apt-get install libbpf1")
    if headers_available() is None:
        return False, (f"BPF unavailable: no kernel headers for {platform.release()}; install "
                       "linux-headers and link /lib/modules/$(uname -r)/build to them "
                       "(scripts/setup-host.sh does it) or set BCC_KERNEL_SOURCE")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return False, ("BPF unavailable: the kernel has no BTF (/sys/kernel/btf/vmlinux); use a kernel "
                       f"built with CONFIG_DEBUG_INFO_BTF=y {OFF_HINT}")
    if tracefs() is None:
        return False, ("BPF unavailable: tracefs is not mounted; "
                       "mount -t tracefs tracefs /sys/kernel/tracing")
    missing = [f"{c}:{e}" for c, e in TRACEPOINTS if tracepoint_fields(c, e) is None]
    if missing:
        return False, (f"BPF unavailable: this kernel lacks tracepoints {', '.join(missing)}; "
                       f"use a kernel built with them (Linux 5.x+ with CONFIG_MEMCG) {OFF_HINT}")
    channel = "ring buffer" if kernel_has_ringbuf() else "perf buffer"
    return True, f"BPF usable: BCC, kernel headers, tracefs and all {len(TRACEPOINTS)} tracepoints present ({channel} events)"


# What the BPF path adds, for `dbguard check` (user-space protections are reported elsewhere).
PROTECTIONS = (
    ("bpf_fork_inheritance", "children of protected processes are protected at birth, in the kernel"),
    ("bpf_reclaim_kill", "a task of the watched scope whose reclaim keeps failing is killed in the kernel, "
     "listed by user space or not (never a database executable, PID 1, dbguard or a kernel thread)"),
    ("bpf_reclaim_cancel", "with [bpf] cancel = true (the default), a PostgreSQL client backend whose reclaim "
     "keeps failing has its statement cancelled in the kernel (SIGINT, PostgreSQL's own cancel; never the "
     "postmaster, an auxiliary process or a walsender)"),
    ("bpf_births", "forks and execs in the watched scope wake the sidecar, which raises the newcomer's score"),
    ("bpf_oom_audit", "every kernel OOM kill is audited; a protected victim is reported as a breach"),
    ("bpf_score_tamper", "a raised oom_score_adj on a protected process is reported and can be restored"),
)


def protections() -> list[tuple[str, bool, str]]:
    """(name, active, what it does or why not) for each BPF protection on this host; no compile."""
    usable, why = availability()
    return [(name, usable, what if usable else why) for name, what in PROTECTIONS]
