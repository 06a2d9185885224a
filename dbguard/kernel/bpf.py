"""The in-kernel fast path: compile and attach dbguard's BPF programs with BCC, keep their
maps in step with the policy, and turn their events into BpfEvents.

Per-tgid maps (protected, candidates) are the primary mechanism. The per-cgroup map is keyed
by bpf_get_current_cgroup_id(), the cgroup v2 id: on a hybrid host whose memory controller is
on cgroup v1 it never matches a memory cgroup, so the daemon compiles cgroup policies into
per-tgid candidate entries there and uses sync_cgroups only on cgroup v2 hosts.

    python -m dbguard.kernel.bpf --print-source   # the C exactly as it is loaded
    python -m dbguard.kernel.bpf --check          # can BPF be used here, and if not, the fix
"""
from __future__ import annotations

import ctypes as ct
import os
import platform
import sys
import time
from pathlib import Path
from typing import Collection

from ..errors import DbguardError
from ..sense.procfs import PAGE_SIZE
from . import layout
from .availability import OFF_HINT, availability, protections
from .events import BpfEvent, decode, event_to_audit
from .layout import ACTION_KILL, ACTION_SHIELD, CANCEL, CANDIDATE, FRESH, INHERIT, INHERITED, SHIELD
from .loader import LoadFailed, Loading
from .maps import Loaded
from .source import program_source
from .sync import ProcEntry, diff_plain, diff_procs

__all__ = ["availability", "protections", "program_source", "BpfEvent", "BpfGuard", "event_to_audit",
           "SHIELD", "INHERIT", "INHERITED", "CANDIDATE", "FRESH", "CANCEL",
           "ACTION_KILL", "ACTION_SHIELD", "scope_of", "exe_identity"]

DEFAULT_FAIL_STREAK = 3


def _read_score(tgid: int) -> int:
    try:
        return int(Path(f"/proc/{tgid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return layout.SCORE_UNKNOWN


def _alive(tgid: int) -> bool:
    return os.path.exists(f"/proc/{tgid}")


def _start_ticks(tgid: int) -> int | None:
    try:
        stat = Path(f"/proc/{tgid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def scope_of(cgroup_dir: str | None) -> tuple[int, int, int]:
    """(scope kind, id, depth) of a memory cgroup directory for the kernel's scope check; the
    host ("" or None) is every task. The id is the directory's inode number (the kernfs node
    id the kernel compares); the depth counts the directories up to the hierarchy's root."""
    if not cgroup_dir:
        return layout.SCOPE_ALL, 0, 0
    path = Path(cgroup_dir)
    st = path.stat()
    level = 0
    while path.parent != path and path.parent.stat().st_dev == st.st_dev:
        path, level = path.parent, level + 1
    return layout.SCOPE_CGROUP, st.st_ino, level


def exe_identity(path: str) -> tuple[int, int] | None:
    """(inode, kernel dev_t) of an executable as the kernel sees it (major << 20 | minor)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, os.major(st.st_dev) << 20 | os.minor(st.st_dev)


class BpfGuard:
    """The loaded programs and their maps. Build with BpfGuard.load(); close() detaches."""

    def __init__(self, bpf: Loaded, source: str):
        self._b = bpf
        self.source = source
        self.cache_note = ""        # what the loader did with the compile cache (set by finish)
        self.cache_warn = False     # ... and whether that is a warning (a stale or damaged entry)
        self.from_cache = False     # loaded from the compile cache, not compiled
        self.not_kept = ""          # why a compile's programs were not kept in the cache ("": kept, or no cache)
        self._pending: list[BpfEvent] = []
        self._procs = bpf[b"procs"]
        self._cgroups = bpf[b"cgroups"]
        self._policy_map = bpf[b"policy"]
        self._counters = bpf[b"counters"]
        self._exes = bpf[b"exes"]
        self._scopes = bpf[b"scopes"]
        self._streaks = bpf[b"streaks"]
        self._victims = bpf[b"victims"]
        self._listed: list[tuple[int, int, int, str, int]] = []
        self._scope_keys: dict[str, int] = {}       # scope directory -> the kernel's key for it (dbg_scope_of)
        self._scope_entries: dict[int, layout.Scope] = {}
        self._policy = layout.Policy(level=0, enabled=0, dry_run=1, min_level_to_kill=3,
                                     fail_streak=DEFAULT_FAIL_STREAK, fail_pages=0,
                                     self_tgid=os.getpid(), n_cgroups=0, early_streak=0,
                                     scope=layout.SCOPE_NONE, scope_level=0, births=0, scope_id=0,
                                     min_anon_pages=0, cancel_gap_ns=0, cancel_streak=0, cancel_pages=0,
                                     cancel_level=0)
        self._write_policy()
        jump = bpf[b"reclaim_jump"]
        for slot, prog in ((0, b"tracepoint__vmscan__mm_vmscan_memcg_reclaim_begin"),
                           (1, b"tracepoint__vmscan__mm_vmscan_memcg_reclaim_end")):
            jump[ct.c_int(slot)] = ct.c_int(bpf.funcs[prog].fd)
        self._lost = 0
        self.ringbuf = bpf.open_events(b"events", self._on_event, self._on_lost)
        self._closed = False

    @staticmethod
    def begin(*, max_procs: int = 16384, max_cgroups: int = 1024, cache_dir: str = "") -> Loading:
        """Start the compile in a child (dbguard.kernel.loader); finish() takes its result.
        cache_dir: where compiled programs are kept for the next start (dbguard.kernel.objcache;
        "" for none)."""
        usable, why = availability()
        if not usable:
            raise DbguardError(f"{why} ({OFF_HINT})")
        return Loading(max_procs, max_cgroups, cache_dir)

    @classmethod
    def finish(cls, loading: Loading) -> "BpfGuard":
        try:
            source, desc, fds = loading.result()
            loaded = Loaded(desc, fds)
        except LoadFailed as e:
            if e.stage == "btf":
                raise DbguardError(f"BPF unavailable: {e} {OFF_HINT}") from None
            raise DbguardError(
                f"BPF programs failed to load: {e}; check the kernel headers BCC uses "
                f"(/lib/modules/{platform.release()}/build or BCC_KERNEL_SOURCE) {OFF_HINT}") from None
        except (OSError, ValueError) as e:
            raise DbguardError(f"BPF programs loaded but not usable: {e} {OFF_HINT}") from None
        try:
            guard = cls(loaded, source)
            guard.cache_note, guard.cache_warn = desc.get("cache", ""), bool(desc.get("cache_warn"))
            guard.from_cache, guard.not_kept = bool(desc.get("from_cache")), desc.get("not_kept", "")
            return guard
        except BaseException:
            loaded.cleanup()
            raise

    @classmethod
    def load(cls, *, max_procs: int = 16384, max_cgroups: int = 1024, cache_dir: str = "") -> "BpfGuard":
        return cls.finish(cls.begin(max_procs=max_procs, max_cgroups=max_cgroups, cache_dir=cache_dir))

    # --- policy --------------------------------------------------------------------------
    def _write_policy(self) -> None:
        self._policy_map[ct.c_int(0)] = self._policy

    def set_policy(self, *, level: int, enabled: bool, dry_run: bool, min_level_to_kill: int = 3,
                   fail_streak: int = DEFAULT_FAIL_STREAK, fail_pages: int = 0, early_streak: int = 0,
                   births: bool = False, min_anon_bytes: int = 0, cancel_streak: int = 0,
                   cancel_gap: float = 0.0, cancel_pages: int = 0, cancel_level: int = 0) -> None:
        """A task is killed when its last N reclaims each freed at most fail_pages pages, N being
        fail_streak from min_level_to_kill on and early_streak below it (0: no kill below).
        Unlisted tasks are killed only in the scope (set_scope) and holding min_anon_bytes of
        anonymous memory. births: report forks and execs in the scope. A client backend
        flagged for cancel (sync_processes) is cancelled after cancel_streak such reclaims
        (0: never; for it a reclaim that freed at most cancel_pages fails too, and from
        cancel_level on, 0 never, every reclaim while it holds min_anon_bytes), one backend per
        cancel_gap seconds at most. Written to the kernel only when it changed."""
        p = self._policy
        new = dict(level=int(level), enabled=int(enabled), dry_run=int(dry_run),
                   min_level_to_kill=int(min_level_to_kill), fail_streak=max(1, int(fail_streak)),
                   fail_pages=int(fail_pages), early_streak=max(0, int(early_streak)), births=int(births),
                   min_anon_pages=max(0, int(min_anon_bytes)) // PAGE_SIZE,
                   cancel_streak=max(0, int(cancel_streak)), cancel_gap_ns=max(0, int(cancel_gap * 1e9)),
                   cancel_pages=max(0, int(cancel_pages)), cancel_level=max(0, int(cancel_level)))
        if any(getattr(p, k) != v for k, v in new.items()):
            for k, v in new.items():
                setattr(p, k, v)
            self._write_policy()

    def set_scope(self, cgroup_dir: str | None, *, unlisted: bool = True) -> None:
        """Where the kernel kills tasks the sidecar has not listed: the memory cgroup directory
        and below it, the host for "" or None; unlisted=False: listed candidates only."""
        self.set_scopes([cgroup_dir or ""], unlisted=unlisted)

    def set_scopes(self, cgroup_dirs: list[str], *, unlisted: bool = True) -> None:
        """set_scope for several scopes (one per database's own limit): unlisted tasks are
        killed in any of them; the host ("") among them is every task."""
        dirs = list(dict.fromkeys(d.rstrip("/") for d in cgroup_dirs)) or [""]
        found: dict[int, int] = {}
        keys: dict[str, int] = {}
        if not unlisted:
            kind, ident, level = layout.SCOPE_NONE, 0, 0
        elif len(dirs) == 1 or "" in dirs:
            kind, ident, level = scope_of("" if "" in dirs else dirs[0])
            keys = dict.fromkeys(dirs, layout.SCOPE_HOST if kind == layout.SCOPE_ALL else ident)
        else:
            keys = {d: scope_of(d)[1] for d in dirs}
            found = {ident: depth for _, ident, depth in map(scope_of, dirs)}
            if len(found) > layout.MAX_SCOPES or not all(0 < d < layout.SCOPE_DEPTH for d in found.values()):
                raise DbguardError(f"{len(found)} scopes at depths {sorted(set(found.values()))}: the kernel's "
                                   f"scope set holds {layout.MAX_SCOPES} at depths 1 to {layout.SCOPE_DEPTH - 1}")
            kind, ident, level = layout.SCOPE_SET, 0, 0
        self._scope_keys = keys
        for key in [k for k in self._scope_entries if k not in found]:
            self._delete(self._scopes, ct.c_uint64(key))
            del self._scope_entries[key]
        for key, depth in found.items():
            old = self._scope_entries.get(key)
            if old is None or old.depth != depth:
                self._scope_entries[key] = layout.Scope(depth, old.level if old else 0)
                self._scopes[ct.c_uint64(key)] = self._scope_entries[key]
        p = self._policy
        if (p.scope, p.scope_id, p.scope_level) != (kind, ident, level):
            p.scope, p.scope_id, p.scope_level = kind, ident, level
            self._write_policy()

    def set_scope_levels(self, levels: dict[str, int]) -> None:
        """Each watched scope's own level (scope directory -> level), for its kill gate: in a set
        of scopes the kernel judges a streak by the level of the scope the task lies in, not by
        the highest of them (set_policy's level, which still serves a single scope)."""
        for d, lvl in levels.items():
            key = self._scope_keys.get(d.rstrip("/"))
            e = self._scope_entries.get(key)
            if e is not None and e.level != int(lvl):
                e.level = int(lvl)
                self._scopes[ct.c_uint64(key)] = e

    def scope_key(self, cgroup_dir: str) -> int:
        """The kernel's key for a watched scope (what dbg_scope_of returns for its tasks); 0 when
        it is not one."""
        return self._scope_keys.get(cgroup_dir.rstrip("/"), 0)

    def set_exes(self, identities: set[tuple[int, int]]) -> None:
        """Database server executables by (inode, kernel dev_t): a task running one is never
        killed in the kernel (see exe_identity)."""
        current = {(k.ino, k.dev) for k in self._exes.keys()}
        for ino, dev in current - identities:
            self._delete(self._exes, layout.Exe(ino, dev))
        for ino, dev in identities - current:
            self._exes[layout.Exe(ino, dev)] = ct.c_uint32(1)

    def exes(self) -> set[tuple[int, int]]:
        return {(k.ino, k.dev) for k in self._exes.keys()}

    def wake_fd(self) -> int | None:
        """A descriptor that polls readable when kernel events wait (ring buffers only)."""
        return self._b[b"events"].map_fd if self.ringbuf else None

    def sync_processes(self, protected: dict[int, tuple[int, int]], candidates: dict[int, int], *,
                       starts: dict[int, int] | None = None, judged: Collection[int] = (),
                       cancel: Collection[int] = frozenset()) -> None:
        """protected: tgid -> (flags, tier) with flags from SHIELD | INHERIT; candidates: tgid -> tier.
        Children the kernel protected at fork stay while they live and their ancestor stays
        protected: the caller need not list them (see dbguard.kernel.sync). A tgid in both is
        protected: SHIELD wins in the kernel. starts: tgid -> /proc start time of the process
        the entry is for (the kernel ignores it for any other holder of the pid, and it is
        checked again here right after the write); judged: the tgids of the caller's snapshot;
        cancel: protected PostgreSQL client backends the kernel cancels at a failing streak
        (CANCEL, on entries with a start time only)."""
        raw = {k.value: (v.flags, v.tier, v.cand_tier, v.origin, v.score, v.start)
               for k, v in self._procs.items()}
        current = {t: ProcEntry(*r) for t, r in raw.items()}
        diff = diff_procs(current, protected, candidates, _alive, starts, judged, cancel)
        for tgid in diff.deletes:
            self._delete(self._procs, ct.c_uint32(tgid))
        for tgid, e in diff.updates.items():
            score = _read_score(tgid) if e.score is None else e.score
            self._procs[ct.c_uint32(tgid)] = layout.Proc(e.flags, e.tier, e.cand_tier, e.origin,
                                                         score, 0, e.start)
        # Right after the write: a process that exited since the snapshot leaves no entry
        # for the next holder of its pid (the kernel ignores it anyway, by start time).
        for tgid, e in diff.updates.items():
            if e.start and _start_ticks(tgid) != e.start:
                self._delete(self._procs, ct.c_uint32(tgid))

    def set_listed_victims(self, listed: list[tuple[int, int, int, str, str]]) -> None:
        """The candidates the kernel may kill for a task that may not be killed, besides the
        ones it found itself: (tgid, start time, candidate tier, comm, the directory of the
        watched scope it lies in: only a stuck task of that scope gets it killed), at most
        LISTED_VICTIMS, written only when they changed (the kernel clears a slot whose process
        it killed or that exited)."""
        keyed = [(t, st, tier, comm, self.scope_key(d)) for t, st, tier, comm, d in list(listed)[:layout.LISTED_VICTIMS]]
        if keyed == self._listed:
            return
        self._listed = keyed
        for i in range(layout.LISTED_VICTIMS):
            tgid, start, tier, comm, key = keyed[i] if i < len(keyed) else (0, 0, 0, "", 0)
            self._victims[ct.c_int(layout.VICTIM_SLOTS + i)] = layout.Victim(
                tgid, layout.EVF_CANDIDATE, start, 0, 0, tier, 0, key, comm.encode()[:15])

    def sync_cgroups(self, policies: dict[int, tuple[int, int]]) -> None:
        """cgroup v2 id -> (tier, action ACTION_KILL/ACTION_SHIELD); see the module doc for v1 hosts."""
        current = {k.value: (v.tier, v.action) for k, v in self._cgroups.items()}
        diff = diff_plain(current, {int(k): (int(t), int(a)) for k, (t, a) in policies.items()})
        for cg in diff.deletes:
            self._delete(self._cgroups, ct.c_uint64(cg))
        for cg, (tier, action) in diff.updates.items():
            self._cgroups[ct.c_uint64(cg)] = layout.Cgroup(tier, action, 0, 0)
        if self._policy.n_cgroups != len(policies):
            self._policy.n_cgroups = len(policies)
            self._write_policy()

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass    # the exit hook removed it first

    def protected_tgids(self) -> dict[int, tuple[int, int]]:
        """tgid -> (flags, tier) as the kernel holds it (INHERITED marks fork-made entries)."""
        mask = SHIELD | INHERIT | INHERITED
        return {k.value: (v.flags & mask, v.tier) for k, v in self._procs.items() if v.flags & mask}

    def candidate_tgids(self) -> dict[int, int]:
        return {k.value: v.cand_tier for k, v in self._procs.items() if v.flags & CANDIDATE}

    def cancel_tgids(self) -> set[int]:
        """Client backends the kernel cancels at a failing streak."""
        return {k.value for k, v in self._procs.items() if v.flags & CANCEL}

    def fresh_tgids(self) -> set[int]:
        """Children of shielded processes the kernel spares until the sidecar judges them."""
        return {k.value for k, v in self._procs.items() if v.flags & FRESH}

    def streak(self, tgid: int) -> tuple[int, bool] | None:
        """(failed reclaims in a row, reported) of a process, or None."""
        try:
            s = self._streaks[ct.c_uint32(tgid)]
        except KeyError:
            return None
        return s.fails, bool(s.reported)

    def cgroup_policies(self) -> dict[int, tuple[int, int]]:
        return {k.value: (v.tier, v.action) for k, v in self._cgroups.items()}

    # --- events and counters -------------------------------------------------------------
    def _on_event(self, _ctx, data, _size) -> None:
        raw = ct.cast(data, ct.POINTER(layout.Event)).contents
        self._pending.append(decode(raw, time.time_ns() - time.monotonic_ns()))

    def _on_lost(self, count: int) -> None:
        self._lost += count

    def poll(self, timeout_ms: int = 0) -> list[BpfEvent]:
        self._b.poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def counters(self) -> dict[str, int]:
        out = {name: 0 for name in layout.COUNTERS.values()}
        for idx, name in layout.COUNTERS.items():
            if idx < layout.NR_COUNTERS:
                out[name] = int(sum(self._counters[ct.c_int(idx)]))
        out["events_dropped"] += self._lost
        out.pop("nr_counters", None)
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._b.cleanup()

    def __enter__(self) -> "BpfGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dbguard.kernel.bpf")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-source", action="store_true", help="print the BPF C exactly as it is loaded")
    g.add_argument("--check", action="store_true", help="say whether BPF can be used here, and the fix if not")
    ap.add_argument("--max-procs", type=int, default=16384)
    ap.add_argument("--max-cgroups", type=int, default=1024)
    a = ap.parse_args(argv)
    if a.print_source:
        sys.stdout.write(program_source(max_procs=a.max_procs, max_cgroups=a.max_cgroups))
        return 0
    usable, why = availability()
    print(why)
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
