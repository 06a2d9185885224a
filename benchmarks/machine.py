"""The host a benchmark ran on: recorded in results.json at run time (`machine()`), and said
in the report from there, so that RESULTS.md never states a host fact that a rerun elsewhere
would make false. A results.json from before a fact was recorded lacks it: the readers here
then return None, and the report says what it does know instead.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from lab.cgroup import own_memory_cgroup
from lab.procs import effective_capabilities

# Capability bits (linux/capability.h) the benchmarks' contenders depend on.
CAPABILITIES = {"CAP_KILL": 5, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _run(*argv: str) -> str | None:
    """First line of a command's output, None when it is not there or says nothing."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return None
    r = subprocess.run(argv, capture_output=True, text=True)
    out = (r.stdout or r.stderr).strip()
    return out.splitlines()[0] if out else None


def _detect_virt(kind: str) -> str | None:
    """systemd-detect-virt --vm / --container: "kvm", "docker", ... or "none"."""
    return _run("systemd-detect-virt", f"--{kind}")


def _cgroup_version() -> int | None:
    try:
        return own_memory_cgroup()[1]
    except RuntimeError:
        return None


def machine() -> dict:
    caps = effective_capabilities()
    flags = _first("/proc/cpuinfo", "flags").split()
    return {
        "kernel": platform.release(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cpu_vendor": _first("/proc/cpuinfo", "vendor_id"),
        "cores": os.cpu_count(),
        "memory": _first("/proc/meminfo", "MemTotal"),
        "swap": _first("/proc/meminfo", "SwapTotal"),
        # systemd-detect-virt when present; else the CPU's hypervisor flag says "a VM" without its kind
        "vm": _detect_virt("vm") or ("yes" if "hypervisor" in flags else "none"),
        "container": _detect_virt("container"),
        "memory_cgroup": _cgroup_version(),
        "capabilities": None if caps is None else {name: bool(caps >> bit & 1) for name, bit in CAPABILITIES.items()},
        "postgresql": _run("/usr/lib/postgresql/15/bin/postgres", "--version") or "?",
        "mariadb": (_run("/usr/sbin/mariadbd", "--version") or "?") if Path("/usr/sbin/mariadbd").exists()
        else "not installed",
        "earlyoom": _run("earlyoom", "-v") or "not installed",
        "python": platform.python_version(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# --- reading it back ---------------------------------------------------------------------------

def machine_of(data: dict, name: str) -> dict:
    """The machine a scenario (or extra) was measured on."""
    return (data.get("provenance") or {}).get(name, {}).get("machine") or data.get("machine", {})


def machine_text(m: dict) -> str:
    where = [v for v in (_vm_text(m), _container_text(m)) if v]
    return (f"Linux {m.get('kernel', '?')}, {m.get('cores', '?')} cores ({m.get('cpu', '?')}), "
            f"{m.get('memory', '?')} RAM, swap {m.get('swap', '?')}; {m.get('postgresql', '?')}; "
            + (f"{m['mariadb']}; " if m.get("mariadb") else "") + f"{m.get('earlyoom', '?')}"
            + (f"; {', '.join(where)}" if where else ""))


def _vm_text(m: dict) -> str | None:
    vm = m.get("vm")
    if vm in (None, "none"):
        return None
    return "a virtual machine" if vm == "yes" else f"a {vm} virtual machine"


def _container_text(m: dict) -> str | None:
    c = m.get("container")
    return None if c in (None, "none") else f"in a {c} container"


def memory_gib(m: dict) -> str | None:
    """MemTotal as "24 GiB" (None when not recorded)."""
    text = str(m.get("memory", ""))
    if not text.endswith(" kB") or not text[:-3].strip().isdigit():
        return None
    return f"{int(text[:-3]) / 1024**2:.0f} GiB"


def has_capability(m: dict, name: str) -> bool | None:
    """Whether the benchmark ran with a capability; None when it was not recorded."""
    caps = m.get("capabilities")
    return None if not isinstance(caps, dict) or name not in caps else bool(caps[name])
