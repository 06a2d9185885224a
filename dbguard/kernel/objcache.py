"""The compiled programs kept on disk, so that a start need not run clang again.

BCC compiles the C with clang inside its loader, which is most of a start with BPF (issue 17).
The instructions BCC produced do not depend on anything but what went into the compile, so
the loader child keeps them in the state directory (`<state_dir>/bpf/programs-<key>.json`)
and a later start loads them itself: maps created, map descriptors and kfunc ids put into
the instructions, every program through the kernel's verifier again, attached to its
tracepoint as BCC attaches it. Nothing stays in the kernel between runs: what a stopped or
crashed dbguard held goes with its descriptors, as without the cache.

Used only when everything a compile reads is as it was (`key`): the C exactly as it would be
compiled now (sizes, kernel struct offsets, features, and the kfunc choice: the C defines
DBG_HAVE_SIGNAL_TASK only when the kernel has every kfunc; the kfuncs' BTF ids are looked up
again at each load), the programs and the tracepoint formats BCC builds their arguments from,
the kernel's release, build and BTF (by digest), the possible CPUs (BCC sizes a perf output map
by them), and the compiler (BCC's version, libbcc and the LLVM libraries it mapped, by inode,
size and mtime). Anything else is a compile, and the compile's entry replaces every other one:
an entry for other inputs (stale), a file that is unreadable or fails its own checksum
(damaged), a directory others can write, a program the verifier now refuses. Each of those is
one warning line from the daemon; only a missing entry (the first start) is not.
"""
from __future__ import annotations

import base64
import ctypes as ct
import fcntl
import hashlib
import json
import os
import platform
import re
from pathlib import Path

from .. import fsafe
from . import kfuncs
from .btf import VMLINUX_BTF
from .cachedir import PREFIX, SUFFIX, kept_entries
from .source import tracefs

FORMAT = 1
READ_LIMIT = 16 << 20
TRACEPOINT = 5                    # BPF_PROG_TYPE_TRACEPOINT: every program BCC loaded for dbguard
LD_IMM64, PSEUDO_MAP_FD = 0x18, 1  # BPF_LD | BPF_DW | BPF_IMM; its src_reg for a map's descriptor
INSN = 8
# The compiler's own libraries, as mapped in the compile child: what it produces depends on them.
COMPILER_LIBS = re.compile(r"/lib(bcc|LLVM|clang)[^/]*\.so[^/]*$")


class Unusable(Exception):
    """Why an entry is not used (one line). `expected`: nothing was kept yet (a first start),
    no reason to warn."""

    def __init__(self, why: str, expected: bool = False):
        super().__init__(why)
        self.expected = expected


def _tracepoint_formats(names: list[tuple[str, str]]) -> str:
    root = tracefs()
    out = []
    for cat, ev in names:
        try:
            out.append((root / "events" / cat / ev / "format").read_text() if root else "")
        except OSError:
            out.append("")
    return "\n".join(out)


def _kernel_build() -> str:
    try:
        return Path("/proc/sys/kernel/version").read_text()
    except OSError:
        return ""


def _kernel_btf() -> str:
    """The digest of the running kernel's BTF: the struct layouts and kfunc ids are read from it."""
    try:
        return hashlib.sha256(VMLINUX_BTF.read_bytes()).hexdigest()
    except OSError:
        return ""


def _possible_cpus() -> str:
    try:
        return Path("/sys/devices/system/cpu/possible").read_text()
    except OSError:
        return ""


def _bcc_version() -> str:
    import importlib.util
    spec = importlib.util.find_spec("bcc")     # found, not imported: no LLVM mapped here
    try:
        return Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except OSError:
        return ""


def tracepoints(names) -> list[tuple[str, str]]:
    """(category, event) of BCC's TRACEPOINT_PROBE program names (tracepoint__cat__event)."""
    out = []
    for name in names:
        if not name.startswith("tracepoint__") or name.count("__") != 2:
            raise Unusable(f"program {name} is not a tracepoint program")
        _, cat, ev = name.split("__")
        out.append((cat, ev))
    return out


def key(source: str, programs: list[str]) -> str:
    """The digest of what the compile reads besides the compiler's libraries: the C, the
    programs and the formats of the tracepoints they attach to, the kernel (release, build,
    BTF), the possible CPUs, BCC's version."""
    h = hashlib.sha256()
    names = sorted(programs)
    for part in (f"dbguard objcache {FORMAT}", source, " ".join(names), _tracepoint_formats(tracepoints(names)),
                 platform.release(), _kernel_build(), _kernel_btf(), _possible_cpus(), _bcc_version()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_ino, st.st_size, st.st_mtime_ns]


def compiler_libs() -> list[list]:
    """(path, inode, size, mtime) of the compiler libraries mapped in this process."""
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.rstrip("\n").split(None, 5)[-1]
            if path.startswith("/") and COMPILER_LIBS.search(path):
                paths.add(path)
    return [_file_id(p) for p in sorted(paths)]


def path_for(directory: str, digest: str) -> Path:
    return Path(directory) / f"{PREFIX}{digest[:32]}{SUFFIX}"


# --- writing (in the compile child, after BCC loaded and attached everything) -------------

def entry(source: str, programs: dict[str, bytes], maps: dict[str, dict], map_fds: dict[int, str],
          license: str, kern_version: int, libs: list[list]) -> dict:
    """An entry for programs as BCC loaded them: `programs` name -> instructions before the
    kfunc rewrite (BCC's map descriptors in them, turned into map names here); `maps` name ->
    {type, key_size, value_size, max_entries, flags, key_fields, leaf_fields}; map_fds: BCC's
    descriptor -> map name."""
    progs = {}
    for name, code in programs.items():
        relocs = []
        for off in range(0, len(code) - INSN + 1, INSN):
            if code[off] == LD_IMM64 and code[off + 1] >> 4:
                if code[off + 1] >> 4 != PSEUDO_MAP_FD:
                    raise Unusable(f"program {name}: a 64-bit load of kind {code[off + 1] >> 4}, not a map")
                fd = int.from_bytes(code[off + 4:off + 8], "little", signed=True)
                if fd not in map_fds:
                    raise Unusable(f"program {name}: descriptor {fd} is no map of this module")
                relocs.append([off // INSN, map_fds[fd]])
        progs[name] = {"insns": base64.b64encode(code).decode(), "maps": relocs}
    tracepoints(progs)
    e = {"format": FORMAT, "key": key(source, list(progs)), "libs": libs, "source": source,
         "license": license, "kern_version": kern_version, "maps": maps, "programs": progs}
    return {**e, "sum": checksum(e)}


def checksum(e: dict) -> str:
    """The digest of an entry's content (all but its "sum"): a file damaged after it was
    written is never loaded, even where the verifier would accept its instructions."""
    body = {k: v for k, v in e.items() if k != "sum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store(directory: str, e: dict) -> str:
    """Write entry `e` and remove every other entry in `directory`; one line saying what was done."""
    fsafe.ensure_dir(str(Path(directory).parent), "general.state_dir")
    fsafe.ensure_dir(directory, "general.state_dir")
    path = path_for(directory, e["key"])
    fsafe.write_atomic(path, json.dumps(e, separators=(",", ":")).encode())
    # Other entries, and what a write stopped by a crash left (fsafe.write_atomic's temp files).
    for other in [*kept_entries(directory), *Path(directory).glob(f".{PREFIX}*.tmp")]:
        if other.name != path.name:
            fsafe.remove(other)
    return f"compiled; kept in {path}"


# --- reading and loading (in the loader child, no compiler) ---------------------------------

def lookup(directory: str, source: str, programs: list[str]) -> dict:
    """The entry for `source`, or Unusable saying why not."""
    # Whoever could write here could have the kernel run their programs as dbguard's.
    why = fsafe.dir_problem(str(Path(directory).parent)) or fsafe.dir_problem(directory)
    if why:
        raise Unusable(why)
    digest = key(source, programs)
    path = path_for(directory, digest)
    try:
        e = json.loads(fsafe.read_small(path, READ_LIMIT))
    except FileNotFoundError:
        stale = [p.name for p in kept_entries(directory)]
        if stale:
            raise Unusable(f"{stale[0]} was compiled for other inputs (the C or its sizes, the kernel, "
                           f"BCC)") from None
        raise Unusable("none kept yet", expected=True) from None
    except (OSError, ValueError) as exc:
        raise Unusable(f"{path.name} unreadable ({exc})") from None
    if not isinstance(e, dict) or e.get("format") != FORMAT:
        raise Unusable(f"{path.name}: another format")
    if e.get("sum") != checksum(e):
        raise Unusable(f"{path.name} is damaged (its checksum does not match)")
    if e.get("key") != digest or e.get("source") != source:
        raise Unusable(f"{path.name} was compiled from other inputs")
    if not isinstance(e.get("programs"), dict) or sorted(e["programs"]) != sorted(programs):
        raise Unusable(f"{path.name} holds other programs than the {len(programs)} loaded")
    try:
        same = all(_file_id(lib[0]) == lib for lib in e["libs"]) and e["libs"]
    except (OSError, TypeError, IndexError, KeyError):
        same = False
    if not same:
        raise Unusable("the compiler changed since")
    return e


class _Attr(ct.Structure):
    """The head of struct perf_event_attr (PERF_ATTR_SIZE_VER1)."""
    _fields_ = [("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
                ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
                ("flags", ct.c_uint64), ("wakeup_events", ct.c_uint32), ("bp_type", ct.c_uint32),
                ("config1", ct.c_uint64), ("config2", ct.c_uint64)]


class _MapOpts(ct.Structure):
    """struct bpf_map_create_opts up to map_flags (libbpf reads no further than sz)."""
    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32)]


class _ProgOpts(ct.Structure):
    """struct bpf_prog_load_opts up to kern_version."""
    _fields_ = [("sz", ct.c_size_t), ("attempts", ct.c_int), ("expected_attach_type", ct.c_uint32),
                ("prog_btf_fd", ct.c_uint32), ("prog_flags", ct.c_uint32), ("prog_ifindex", ct.c_uint32),
                ("kern_version", ct.c_uint32)]


PERF_TYPE_TRACEPOINT, PERF_SAMPLE_RAW, PERF_FLAG_FD_CLOEXEC = 2, 1 << 10, 8
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408
NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}


def _attach(prog_fd: int, cat: str, ev: str) -> int:
    """A perf event on the tracepoint running the program, as BCC's bpf_attach_tracepoint opens it."""
    nr = NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(f"perf_event_open's number on {platform.machine()} is not known here")
    tp_id = int((tracefs() / "events" / cat / ev / "id").read_text())
    attr = _Attr(type=PERF_TYPE_TRACEPOINT, size=ct.sizeof(_Attr), config=tp_id, sample_period=1,
                 sample_type=PERF_SAMPLE_RAW, wakeup_events=1)
    libc = ct.CDLL(None, use_errno=True)
    libc.syscall.restype = ct.c_long
    fd = libc.syscall(ct.c_long(nr), ct.byref(attr), ct.c_int(-1), ct.c_int(0), ct.c_int(-1),
                      ct.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"perf_event_open on {cat}:{ev}: {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def load(e: dict, kfunc_ids: dict[str, int]) -> tuple[dict, list[int]]:
    """Maps created, programs loaded (verified by the kernel) and attached from entry `e`:
    (the loader's description, descriptors) as dbguard.kernel.loader hands them over. OSError
    or ValueError when anything fails (every descriptor made so far closed)."""
    from .maps import libbpf
    lib = libbpf()
    for fn, args in (("bpf_map_create", [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32,
                                         ct.POINTER(_MapOpts)]),
                     ("bpf_prog_load", [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_void_p, ct.c_size_t,
                                        ct.POINTER(_ProgOpts)])):
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, ct.c_int
    fds: list[int] = []
    desc: dict = {"maps": {}, "progs": {}, "links": []}
    try:
        by_name = {}
        for name, m in e["maps"].items():
            opts = _MapOpts(sz=ct.sizeof(_MapOpts), map_flags=int(m["flags"]))
            fd = lib.bpf_map_create(int(m["type"]), name.encode()[:15], int(m["key_size"]),
                                    int(m["value_size"]), int(m["max_entries"]), ct.byref(opts))
            if fd < 0:
                raise OSError(ct.get_errno(), f"map {name}: {os.strerror(ct.get_errno())}")
            by_name[name] = fd
            desc["maps"][name] = {"fd": len(fds), "key_fields": m.get("key_fields"),
                                  "leaf_fields": m.get("leaf_fields")}
            fds.append(fd)
        attach = []
        for name, p in e["programs"].items():
            code = bytearray(base64.b64decode(p["insns"]))
            for index, map_name in p["maps"]:
                code[index * INSN + 4:index * INSN + 8] = by_name[map_name].to_bytes(4, "little")
            kfuncs.rewrite(code, kfunc_ids)
            buf = (ct.c_uint8 * len(code)).from_buffer(code)
            opts = _ProgOpts(sz=ct.sizeof(_ProgOpts), kern_version=int(e["kern_version"]))
            fd = lib.bpf_prog_load(TRACEPOINT, name.encode()[:15], e["license"].encode(), buf,
                                   len(code) // INSN, ct.byref(opts))
            if fd < 0:
                raise OSError(ct.get_errno(), f"program {name}: {os.strerror(ct.get_errno())}")
            desc["progs"][name] = len(fds)
            fds.append(fd)
            attach.append((fd, *tracepoints([name])[0]))
        for fd, cat, ev in attach:
            link = _attach(fd, cat, ev)
            desc["links"].append(len(fds))
            fds.append(link)
    except BaseException:
        for fd in reversed(fds):
            os.close(fd)
        raise
    return desc, fds
