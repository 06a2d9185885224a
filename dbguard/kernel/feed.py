"""The daemon's side of the kernel path: what it writes to the BPF maps, and what it does with
the kernel's events.

Writing (sync, once per cycle): the kill gate (streaks by level, pages, the size an unlisted
task must hold), the cancel gate (PostgreSQL client backends), the watched scopes, the
database servers' executables, and the per-process entries compiled from each scope's
policy's verdicts, each with its process's start time.

Reading (drain, every cycle and whenever the kernel's ring buffer wakes the daemon): a killed
victim's memory is released at once (process_mrelease); kills, cancels and kernel OOM victims
go to the audit log and metrics, a raised shield is put back (to the
same process only: the event carries its start time), and a process born in the scope is
scored at once through act/. Reading never depends on the sync having worked: a full map or
a BCC error in the sync must not hide the kernel's kills.
"""
from __future__ import annotations

import glob
import logging
import time
from dataclasses import replace
from typing import Iterable

from ..act import process
from ..settings import Config
from ..databases import registry
from ..errors import DbguardError
from ..model import Level, ProcKey, Role, Snapshot
from ..sense.procfs import read_proc
from ..sense.scope import owner
from .bpf import INHERIT, SHIELD, BpfEvent, BpfGuard, event_to_audit, exe_identity
from .events import OwnKills
from .layout import LISTED_VICTIMS
from .sync import listed_victims

log = logging.getLogger("dbguard")

# Processes whose executable is a database server's: identified servers, and server
# executables nobody identified (databases/identity: DB_UNKNOWN).
SERVER_ROLES = registry.server_roles() | {Role.DB_UNKNOWN}
# Kernel event kind -> dbguard_kernel_events_total kind
METRIC_KIND = {"kill": "bpf_kill", "would_kill": "bpf_would_kill", "cancel": "bpf_cancel",
               "would_cancel": "bpf_would_cancel", "oom_victim": "oom_kill", "breach": "oom_kill"}


def known_server_exes() -> set[tuple[int, int]]:
    """The identities of every installed database server executable the registry names."""
    out = set()
    for kind in registry.KINDS.values():
        for pattern in kind.install_paths:
            for path in glob.glob(pattern):
                ident = exe_identity(path)
                if ident is not None:
                    out.add(ident)
    return out


def running_server_exes(snap: Snapshot) -> set[tuple[int, int]]:
    """The executables the identified servers run now (a build in an unusual place too)."""
    out = set()
    for pid, role in snap.roles.items():
        if role in SERVER_ROLES:
            ident = exe_identity(f"/proc/{pid}/exe")
            if ident is not None:
                out.add(ident)
    return out


def released(ev: BpfEvent) -> BpfEvent:
    """`ev`, a kill the BPF program sent, once its victim's memory was released (act.process:
    by pidfd, the event's start time checked): the kernel waits for its own OOM victims only,
    so until the victim's exit frees its pages the kernel's OOM killer may choose another."""
    start = ev.detail.get("start_time")
    ok, why = process.release(ProcKey(ev.tgid, start)) if start else (False, "the event has no start time")
    if not ok:
        log.info("BPF kill of %s (pid %d): memory not released: %s", ev.comm, ev.tgid, why)
    return replace(ev, detail={**ev.detail, "memory_released": ok, **({} if ok else {"release": why})})


class KernelFeed:
    def __init__(self, bpf: BpfGuard, cfg: Config, scope_dirs: list[str]):
        """scope_dirs: the memory cgroup directory of each watched scope ("": the host)."""
        self.bpf = bpf
        self._known = known_server_exes()
        self._server_exes: set[tuple[int, int]] = set()
        self._own_kills = OwnKills()
        self.rescope(cfg, scope_dirs)
        bpf.set_exes(self._known)

    def rescope(self, cfg: Config, scope_dirs: list[str]) -> None:
        try:
            self.bpf.set_scopes(scope_dirs, unlisted=cfg.bpf.unlisted)
        except DbguardError as e:
            log.warning("%s; the kernel kills listed candidates only", e)
            self.bpf.set_scopes(scope_dirs, unlisted=False)

    def sync(self, answered: Iterable[tuple[object, Snapshot]], level: Level, cfg: Config, dry_run: bool,
             levels: dict[str, Level] | None = None) -> None:
        """answered: (policy, snapshot) of each scope; level: the highest of them; levels: each
        scope's own (its memory cgroup directory -> level), the kill gate of its tasks."""
        b = cfg.bpf
        self.bpf.set_policy(level=int(level), enabled=cfg.kill.enabled, dry_run=dry_run,
                            min_level_to_kill=b.min_level_to_kill, fail_streak=b.fail_streak,
                            fail_pages=b.fail_pages, early_streak=b.early_fail_streak, births=b.births,
                            min_anon_bytes=cfg.kill.min_rss, cancel_streak=b.cancel_streak if b.cancel else 0,
                            cancel_gap=b.cancel_interval, cancel_pages=b.cancel_pages,
                            cancel_level=b.cancel_level)
        self.bpf.set_scope_levels({d: int(lv) for d, lv in (levels or {}).items()})
        answered = list(answered)
        running = set().union(*(running_server_exes(snap) for _, snap in answered))
        if running != self._server_exes:
            self._server_exes = running
            self.bpf.set_exes(self._known | running)
        # One decision, two enforcers: the maps are compiled from the same verdicts the
        # user-space kill path uses (per tgid, also for cgroup rules: on cgroup v1 the
        # kernel's per-cgroup map never matches a memory cgroup; see dbguard.kernel.bpf).
        # Each scope lists the processes it holds; no process is held by two.
        protected, candidates, starts, cancel, held = {}, {}, {}, set(), {}
        scope_of: dict[int, str] = {}
        for policy, snap in answered:
            view = policy.kernel_view(snap)
            protected.update({pid: (SHIELD | INHERIT if inherit else SHIELD, tier)
                              for pid, (inherit, tier) in view.protected.items()})
            candidates.update(view.candidates)
            starts.update({pid: snap.procs[pid].start_time for pid in (*view.protected, *view.candidates)
                           if pid in snap.procs})
            held.update({pid: snap.procs[pid] for pid in view.candidates if pid in snap.procs})
            scope_of.update(dict.fromkeys(view.candidates, snap.memory.cgroup or ""))
            cancel |= view.cancel
        judged = answered[0][1].procs.keys() if len(answered) == 1 else \
            set().union(*(snap.procs for _, snap in answered))
        self.bpf.sync_processes(protected, candidates, starts=starts, judged=judged,
                                cancel=frozenset(cancel) if b.cancel else frozenset())
        # The largest of each scope, for the kernel to kill when a task of that scope that may not
        # be killed is stuck.
        listed = listed_victims({p: (scope_of[p], held[p].rss_bytes) for p in held}, LISTED_VICTIMS)
        self.bpf.set_listed_victims([(p, starts[p], candidates[p], held[p].comm, scope_of[p]) for p in listed])

    def is_server_exe(self, pid: int) -> bool:
        ident = exe_identity(f"/proc/{pid}/exe")
        return ident is not None and ident in (self._known | self._server_exes)

    def drain(self, daemon) -> list[BpfEvent]:
        """Read the kernel's events and answer each (in the scope of the process concerned,
        with the last cycle's snapshot of it); returns them."""
        try:
            events = self.bpf.poll(0)
        except Exception as e:      # BCC errors must not stop the loop
            log.warning("BPF events not read: %s", e)
            return []
        level = daemon.level
        for ev in events:
            if ev.kind == "birth":
                self._newborn(daemon, ev, level)
                continue
            if ev.kind == "reclaim_fail":
                continue            # a wake-up: the cycle that follows reads the pressure
            if ev.kind == "kill" and ev.detail.get("signal_result") == 0:
                ev = released(ev)
            ev = self._own_kills.see(ev)
            rec = event_to_audit(ev)
            snap = next((s for s in daemon.snaps if ev.pid in s.procs), None)   # its scope at the last cycle
            if len(daemon.snaps) > 1:
                rec["scope"] = (snap.memory.cgroup or "host") if snap is not None else "unknown"
            daemon.audit.write(rec)
            old = ev.detail.get("old_score_adj")
            if ev.kind == "score_tamper" and not daemon.dry_run and old is not None and daemon.snaps:
                daemon.executor.restore_score(ev.pid, old, f"restore the shield: {rec['reason']}", level,
                                              snap or daemon.snaps[0],
                                              start_time=ev.detail.get("start_time"))
            daemon.metrics.observe_kernel_event(METRIC_KIND.get(ev.kind, ev.kind),
                                                breach=ev.kind in ("breach", "score_tamper"))
        try:
            daemon.metrics.observe_bpf_counters(self.bpf.counters())
        except Exception as e:
            log.debug("BPF counters not read: %s", e)
        return events

    def _newborn(self, daemon, ev: BpfEvent, level: Level) -> None:
        proc = read_proc(ev.pid)
        if not daemon.snaps or proc is None or proc.kernel_thread or proc.pid == daemon.snaps[0].self_pid \
                or self.is_server_exe(proc.pid):
            return
        w = daemon.watches[owner(proc.memcg, [w.memcg for w in daemon.watches])]     # its scope
        snap = next((s for s in daemon.snaps if s.memory.cgroup == w.cgroup), daemon.snaps[0])
        a = w.policy.newborn(proc, snap.self_pid, snap.memory.limit_bytes, w.state)
        if a is None:
            return
        one = Snapshot(ts=time.time(), memory=snap.memory, procs={proc.pid: proc}, roles={},
                       databases=snap.databases, self_pid=snap.self_pid)
        daemon.executor.one(a, level, one)
