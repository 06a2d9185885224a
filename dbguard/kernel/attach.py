"""The kernel path, started beside the daemon's own start and attached when it is ready.

BCC's compile (the loader child, kernel.loader) takes seconds on a small host; loading what an
earlier compile kept (kernel.objcache) a fraction of one. Neither holds the daemon back: it
protects on the user-space path as soon as that is ready (its "start" record says the kernel
path is compiling or loading), runs its cycles, and attaches the kernel path at the first cycle
after the child answered, with a "bpf_attached" audit record (seconds since the child started,
whether from the compile cache). A restart takes the same path as a first start: only its
timing differs.

[bpf] enabled = true: what can be told before the start (no BPF, no BTF, no BCC:
kernel.availability) refuses the start; a compile, load or attach that fails later is a
"bpf_failed" record and stops the daemon with that one line, after it put back what it
changed, as any stop does. enabled = "auto": the same record, a warning, and the user-space
path goes on alone.
"""
from __future__ import annotations

import logging
import os
import time

from ..settings import Config
from ..errors import DbguardError

log = logging.getLogger("dbguard")

# Compiled BPF programs are kept here, under general.state_dir, for the next start (kernel.objcache).
BPF_CACHE = "bpf"
COMPILING, LOADING = "kernel path compiling", "kernel path loading from the compile cache"
MEANWHILE = "the user-space path protects meanwhile"


def cache_dir(cfg: Config) -> str:
    return os.path.join(cfg.general.state_dir, BPF_CACHE)


class KernelStart:
    """The BPF path's state in the daemon: off, under way in the loader child, attached, or
    given up (`note` says which, for the start record, the logs and /healthz)."""

    def __init__(self, cfg: Config):
        self.enabled = cfg.bpf.enabled
        self.loading = None
        self.note = "BPF path off ([bpf] enabled = false)"
        if self.enabled is False:
            return
        from .bpf import BpfGuard
        try:
            self.loading = BpfGuard.begin(max_procs=cfg.bpf.max_procs, max_cgroups=cfg.bpf.max_cgroups,
                                          cache_dir=cache_dir(cfg))
        except DbguardError as e:
            self._give_up(e)

    def _give_up(self, e: DbguardError) -> None:
        if self.enabled is True:
            raise DbguardError(f"{e} ([bpf] enabled = true requires it)") from None
        self.note = f"running on the user-space path alone: {e}"
        log.warning("%s", self.note)

    def describe(self) -> str:
        if self.loading is None:
            return self.note
        return f"{COMPILING if self.loading.compiling else LOADING} ({MEANWHILE})"

    def fileno(self) -> int | None:
        """Readable when the child has something to say: the daemon's wait polls it."""
        return self.loading.fileno() if self.loading is not None else None

    def ready(self) -> bool:
        return self.loading is not None and self.loading.done()

    def attach(self, audit, level: str):
        """The child's programs taken over (BpfGuard), or None when that failed and the
        user-space path goes on alone; DbguardError when [bpf] enabled = true."""
        from .bpf import BpfGuard
        from .loader import attached_note
        loading, self.loading = self.loading, None
        try:
            bpf = BpfGuard.finish(loading)
        except DbguardError as e:
            stop = self.enabled is True
            audit.write({"action": "bpf_failed", "target": "dbguard", "level": level, "reason": str(e),
                         "result": "stopping: [bpf] enabled = true requires it" if stop
                         else "running on the user-space path alone",
                         "seconds": round(time.monotonic() - loading.started, 3)})
            self._give_up(e)
            return None
        seconds = time.monotonic() - loading.started
        if bpf.cache_note:
            (log.warning if bpf.cache_warn else log.info)("BPF programs: %s", bpf.cache_note)
        self.note = attached_note(bpf.from_cache)
        log.info("kernel path attached %.2f s after its %s began", seconds, "load" if bpf.from_cache else "compile")
        audit.write({"action": "bpf_attached", "target": "dbguard", "level": level,
                     "reason": bpf.cache_note or self.note, "result": self.note,
                     "seconds": round(seconds, 3), "from_cache": bpf.from_cache})
        return bpf

    def close(self) -> None:
        if self.loading is not None:
            self.loading.cancel()
            self.loading = None


def warm(cfg: Config) -> str:
    """`dbguard bpf-compile`: the programs compiled into the compile cache (state_dir/bpf) with
    this config's sizes, so that the next start loads them without clang; one line saying what
    was done. They are attached for the moment it takes (with the kernel's policy off: nothing is
    killed or cancelled) and detached. DbguardError when BPF is unusable here or nothing could be
    kept."""
    if cfg.bpf.enabled is False:
        return "BPF path off ([bpf] enabled = false): nothing to compile"
    from .bpf import BpfGuard
    guard = BpfGuard.load(max_procs=cfg.bpf.max_procs, max_cgroups=cfg.bpf.max_cgroups, cache_dir=cache_dir(cfg))
    note, warn, cached, not_kept = guard.cache_note, guard.cache_warn, guard.from_cache, guard.not_kept
    guard.close()
    if not_kept:
        raise DbguardError(f"BPF programs compiled but not kept: {not_kept}")
    if cached:
        return f"already compiled: {note}"
    # The cache missed: said when that is news (a stale or damaged entry), not when none was kept.
    return note if warn else note.split("; ", 1)[-1]


def start_note(cfg: Config) -> str | None:
    """For `dbguard check`: whether the next start loads the BPF programs from the compile cache
    or compiles them (nothing is compiled here); None when the BPF path is off or unusable
    (said by the check's other lines)."""
    from .bpf import availability
    if cfg.bpf.enabled is False or not availability()[0]:
        return None
    from . import objcache
    from .btf import BtfError
    from .loader import PROGRAMS
    from .source import program_source
    try:
        objcache.lookup(cache_dir(cfg), program_source(max_procs=cfg.bpf.max_procs, max_cgroups=cfg.bpf.max_cgroups),
                        list(PROGRAMS))
    except (objcache.Unusable, BtfError) as e:
        return (f"the next start compiles the BPF programs (\"{COMPILING}\" until they are attached; {MEANWHILE}): "
                f"compile cache not usable: {e}; `dbguard bpf-compile` fills it")
    return f"the next start loads the BPF programs from the compile cache in {cache_dir(cfg)}, without a compile"
