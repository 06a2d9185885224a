"""BCC's compile in a short-lived child, so that the daemon never maps LLVM.

BCC compiles C with clang/LLVM inside the calling process: once loaded, libbcc and LLVM
keep ~50 MiB of that process's memory (relocated data, heap) for nothing. The daemon starts
this module as a child (`python -m dbguard.kernel.loader FD MAX_PROCS MAX_CGROUPS`) first
thing, so it runs beside the daemon's own start: it assembles the C for the running kernel
(its struct offsets from BTF), compiles, loads and attaches the programs, then hands every map, program and attachment descriptor to
the daemon over the unix socket FD (SCM_RIGHTS) with a JSON description, and exits. The
kernel keeps programs, maps and attachments alive as long as the daemon holds the
descriptors; dbguard.kernel.maps reads and writes them through libbpf.

The child imports BCC and dbguard's source assembly only.
"""
from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cachedir import kept_entries
from .source import TRACEPOINTS

# One message: the description and every descriptor (SCM_MAX_FD is 253).
MAX_FDS = 250
MAX_MESSAGE = 1 << 20      # the description and the C source (~25 kB)
TIMEOUT_S = 120.0       # a compile on a loaded 2-core host takes ~1-2 s
FROM_CACHE = "loaded from the compile cache"     # how the loader's note starts when nothing was compiled
PROGRESS = b'{"progress": "compiling"}'    # the child's word, before its answer, that it runs clang


class LoadFailed(Exception):
    """The child could not compile, load or attach (stage "compile": the message is the
    compiler's first error, or the verifier's decisive line) or read the running kernel's
    layout (stage "btf")."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


_PROCESSED = re.compile(r"^processed \d+ insns")      # the verifier's last line, its summary
_INSN = re.compile(r"^\d+: \(")                       # an instruction the verifier walked ("12: (85) call ...")
_PROGRAM = re.compile(r"Failed to load BPF program b?'([^']+)'")


def _verifier_error(text: str, program: str = "") -> str | None:
    """One line from a verifier rejection that BCC printed (its log then "processed N insns ..."):
    the program, the verifier's decisive line(s) just above the summary, the instruction they are
    about, BCC's first hint and the summary; None when `text` holds no verifier log."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    ends = [i for i, ln in enumerate(lines) if _PROCESSED.match(ln)]
    if not ends:
        return None
    end = ends[-1]
    decisive: list[str] = []
    insn = ""
    for ln in reversed(lines[:end]):
        if not ln.strip() or ln.startswith("bpf: Failed to load program"):
            break
        if _INSN.match(ln):
            insn = re.sub(r"\s+;.*$", "", ln).strip()     # without the register states after ';'
            break
        if len(decisive) == 3:
            break
        decisive.insert(0, ln.strip())
    hint = next((ln.strip() for ln in lines[end + 1:] if ln.startswith("HINT:")), "")
    m = _PROGRAM.search(program)
    parts = [f"{m.group(1)}: " if m else "", " ".join(decisive) or "rejected by the verifier",
             f" (at {' '.join(insn.split())})" if insn else "", f"; {hint}" if hint else "",
             f"; {lines[end].strip()}"]
    return "".join(parts)


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _fields(desc: str) -> list[str] | None:
    """Field names of a struct in BCC's JSON type description ([name, [[field, type], ...], "struct"])."""
    try:
        d = json.loads(desc)
    except ValueError:
        return None
    if isinstance(d, list) and len(d) >= 2 and isinstance(d[1], list):
        return [f[0] for f in d[1] if isinstance(f, list) and f]
    return None


def _compile(source: str, keep: bool) -> tuple[dict, list[int], dict | None]:
    """BCC's compile, load and attach: (description, descriptors, the objcache entry when
    `keep`, else None)."""
    import ctypes as ct

    from bcc.libbcc import lib

    from . import objcache
    from .btf import kernel_kfuncs
    from .kfuncs import bcc_class
    from .maps import map_info
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ct.c_size_t, [ct.c_void_p]
    lib.bpf_table_name.restype, lib.bpf_table_name.argtypes = ct.c_char_p, [ct.c_void_p, ct.c_size_t]
    b = bcc_class(kernel_kfuncs())(text=source.encode())   # compiles, loads, and attaches every TRACEPOINT_PROBE
    fds: list[int] = []
    maps, kept, map_fds = {}, {}, {}
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i)
        fd = lib.bpf_table_fd(b.module, name)
        if fd < 0:
            continue
        maps[name.decode()] = {"fd": len(fds),
                               "key_fields": _fields((lib.bpf_table_key_desc(b.module, name) or b"").decode()),
                               "leaf_fields": _fields((lib.bpf_table_leaf_desc(b.module, name) or b"").decode())}
        if keep:
            info = map_info(fd)
            kept[name.decode()] = {"type": info.type, "key_size": info.key_size, "value_size": info.value_size,
                                   "max_entries": info.max_entries, "flags": info.map_flags,
                                   "key_fields": maps[name.decode()]["key_fields"],
                                   "leaf_fields": maps[name.decode()]["leaf_fields"]}
            map_fds[fd] = name.decode()
        fds.append(fd)
    progs = {}
    for name, fn in b.funcs.items():
        progs[name.decode()] = len(fds)
        fds.append(fn.fd)
    links = []
    for table in (b.tracepoint_fds, b.raw_tracepoint_fds, b.kfunc_entry_fds, b.kfunc_exit_fds, b.lsm_fds):
        for fd in table.values():
            links.append(len(fds))
            fds.append(fd)
    if len(fds) > MAX_FDS:
        raise LoadFailed(f"{len(fds)} descriptors to hand over, more than {MAX_FDS}", "compile")
    entry = None
    if keep:
        try:
            entry = objcache.entry(source, getattr(b, "compiled", {}), kept, map_fds,
                                   lib.bpf_module_license(b.module).decode(),
                                   lib.bpf_module_kern_version(b.module), objcache.compiler_libs())
        except objcache.Unusable as e:
            entry = {"unusable": str(e)}
    return {"maps": maps, "progs": progs, "links": links}, fds, entry


def _from_cache(cache_dir: str, source: str) -> tuple[dict, list[int], str]:
    """The programs kept by an earlier compile of the same source (dbguard.kernel.objcache),
    loaded without a compiler; objcache.Unusable says why not."""
    from . import objcache
    from .btf import kernel_kfuncs
    e = objcache.lookup(cache_dir, source, list(PROGRAMS))
    try:
        desc, fds = objcache.load(e, kernel_kfuncs())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise objcache.Unusable(f"its programs did not load ({exc})") from None
    return desc, fds, f"{FROM_CACHE} (not compiled)"


# The programs BCC loads (one per TRACEPOINT_PROBE), by BCC's names: the cache's key reads
# their tracepoints' formats, which BCC compiled their arguments from.
PROGRAMS = tuple(f"tracepoint__{cat}__{ev}" for cat, ev in TRACEPOINTS)


def child(fd: int, max_procs: int, max_cgroups: int, cache_dir: str = "") -> int:
    sock = socket.socket(fileno=fd)
    from .btf import BtfError
    from .source import program_source
    try:
        source = program_source(max_procs=max_procs, max_cgroups=max_cgroups)
    except BtfError as e:
        sock.send(json.dumps({"error": str(e), "stage": "btf"}).encode())
        return 1
    # "cache": one line on what was done with the compile cache; "cache_warn": whether that
    # line is a warning (an entry there but not usable, or the compile's entry not kept);
    # "from_cache": loaded from a kept entry, not compiled; "not_kept": why a compile's entry
    # was not kept ("" when it was, or when there is no cache).
    missed, warn = "", False
    if cache_dir:
        from .objcache import Unusable
        try:
            desc, fds, note = _from_cache(cache_dir, source)
            socket.send_fds(sock, [json.dumps({**desc, "source": source, "cache": note, "from_cache": True}).encode()],
                            fds)
            return 0
        except Unusable as e:
            missed, warn = f"compile cache not used: {e}", not e.expected
    sock.send(PROGRESS)
    try:
        desc, fds, entry = _compile(source, bool(cache_dir))
    except Exception as e:      # BCC raises bare Exception for compile and attach errors
        sock.send(json.dumps({"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                              "stage": "compile"}).encode())
        return 1
    kept, not_kept = "", ""
    if entry is not None:
        from ..errors import DbguardError
        from . import objcache
        try:
            if "unusable" in entry:
                not_kept = entry["unusable"]
            else:
                kept = objcache.store(cache_dir, entry)
        except (OSError, DbguardError) as e:
            not_kept = str(e)
        kept = kept or f"not kept: {not_kept}"
        warn = warn or bool(not_kept)
    note = "; ".join(filter(None, (missed, kept)))
    socket.send_fds(sock, [json.dumps({**desc, "source": source, "cache": note, "cache_warn": warn,
                                       "from_cache": False, "not_kept": not_kept}).encode()], fds)
    return 0


def attached_note(from_cache: bool) -> str:
    """What the daemon says of its kernel path once attached, by what the loader did."""
    return "BPF path active (programs " + ("from the compile cache)" if from_cache else "compiled)")


class Loading:
    """A compile under way in a child (started at once, so the daemon's own start goes on
    beside it). done() says, without waiting, whether its answer is in; result() takes it,
    waiting if need be."""

    def __init__(self, max_procs: int, max_cgroups: int, cache_dir: str = ""):
        self.started = time.monotonic()
        # Compiling for sure when nothing is kept (a first start); else until the child says so.
        self.compiling = not cache_dir or not kept_entries(cache_dir)
        self._answer: tuple[bytes, list[int]] | None = None
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The child finds this package where the daemon found it (a source tree, a venv, the .deb).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p))
        # Its stderr (BCC's and the verifier's words) to a file: a pipe nobody reads while the
        # daemon runs its cycles could fill and stop the child.
        self._err = tempfile.TemporaryFile()
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dbguard.kernel.loader", str(theirs.fileno()), str(max_procs), str(max_cgroups),
                 cache_dir],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err,
                pass_fds=(theirs.fileno(),), env=env, close_fds=True)

    def fileno(self) -> int:
        """Readable when the child says something (that it compiles, its answer) or exits."""
        return self._sock.fileno()

    def done(self) -> bool:
        """Whether the child answered, exited without an answer or ran out of time (TIMEOUT_S),
        read without waiting."""
        self._sock.setblocking(False)       # Python 3.11's recv_fds ignores its flags (MSG_DONTWAIT)
        while self._answer is None:
            try:
                msg, fds, _, _ = socket.recv_fds(self._sock, MAX_MESSAGE, MAX_FDS)
            except BlockingIOError:
                return time.monotonic() - self.started > TIMEOUT_S
            if msg == PROGRESS and not fds:
                self.compiling = True
                continue
            self._answer = (msg, fds)       # b"": it exited without a word
        return True

    def cancel(self) -> None:
        """The child stopped and everything it handed over closed (the daemon stops first)."""
        self._proc.kill()
        self._proc.wait()
        self._sock.close()
        self._err.close()
        for fd in self._answer[1] if self._answer else ():
            os.close(fd)

    def result(self) -> tuple[str, dict, list[int]]:
        """(the C as compiled, description, descriptors now owned by the caller). Raises
        LoadFailed with the compiler's first error or the verifier's decisive line (stage
        "compile") or why the running kernel's layout could not be read (stage "btf")."""
        while not self.done():
            select.select([self._sock], [], [], max(0.01, self.started + TIMEOUT_S - time.monotonic()))
        proc = self._proc
        if self._answer is None:
            self.cancel()
            raise LoadFailed(f"the BPF compile did not finish in {TIMEOUT_S:g} s", "compile")
        try:
            proc.wait(timeout=TIMEOUT_S)        # it leaves right after its answer
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._sock.close()
        self._err.seek(0)
        err = self._err.read()
        self._err.close()
        msg, fds = self._answer
        try:
            desc = json.loads(msg) if msg else {"error": ""}
        except ValueError:
            desc = {"error": "the loader's answer could not be read"}
        if "error" in desc or proc.returncode != 0:
            for fd in fds:
                os.close(fd)
            stage = desc.get("stage", "compile")
            text = err.decode(errors="replace")
            detail = (desc.get("error") if stage == "btf" else None) \
                or _verifier_error(text, desc.get("error") or "") or _first_error(text) \
                or desc.get("error") or f"the loader exited with status {proc.returncode}"
            raise LoadFailed(detail, stage)
        return desc.pop("source"), desc, fds


if __name__ == "__main__":
    try:
        code = child(*map(int, sys.argv[1:4]), *sys.argv[4:5])
    finally:
        sys.stdout.flush()
    # Not BCC's atexit cleanup: the daemon holds the descriptors now, and leaving at once
    # skips the interpreter's teardown of LLVM.
    os._exit(code)
