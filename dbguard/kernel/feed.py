"""The daemon's side of the kernel path: what it writes to the BPF maps, and what it does with
the kernel's events.

Writing (sync, once per cycle): the kill gate (streaks by level, pages, the size an unlisted
task must hold), the cancel gate (PostgreSQL client backends), the scope, the database
servers' executables, and the per-process entries compiled from the policy's verdicts, each
with its process's start time.

Reading (drain, every cycle and whenever the kernel's ring buffer wakes the daemon): kills,
cancels and kernel OOM victims go to the audit log and metrics, a raised shield is put back (to the
same process only: the event carries its start time), and a process born in the scope is
scored at once through act/. Reading never depends on the sync having worked: a full map or
a BCC error in the sync must not hide the kernel's kills.
"""
from __future__ import annotations

import glob
import logging
import time

from ..config import Config
from ..databases import registry
from ..model import Level, Role, Snapshot
from ..sense.procfs import read_proc
from .bpf import INHERIT, SHIELD, BpfEvent, BpfGuard, event_to_audit, exe_identity

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


class KernelFeed:
    def __init__(self, bpf: BpfGuard, cfg: Config, scope_dir: str | None):
        self.bpf = bpf
        self._known = known_server_exes()
        self._scope = scope_dir
        self._server_exes: set[tuple[int, int]] = set()
        bpf.set_scope(scope_dir, unlisted=cfg.bpf.unlisted)
        bpf.set_exes(self._known)

    def rescope(self, cfg: Config, scope_dir: str | None) -> None:
        self._scope = scope_dir
        self.bpf.set_scope(scope_dir, unlisted=cfg.bpf.unlisted)

    def sync(self, snap: Snapshot, level: Level, policy, cfg: Config, dry_run: bool) -> None:
        b = cfg.bpf
        self.bpf.set_policy(level=int(level), enabled=cfg.kill.enabled, dry_run=dry_run,
                            min_level_to_kill=b.min_level_to_kill, fail_streak=b.fail_streak,
                            fail_pages=b.fail_pages, early_streak=b.early_fail_streak, births=b.births,
                            min_anon_bytes=cfg.kill.min_rss, cancel_streak=b.cancel_streak if b.cancel else 0,
                            cancel_gap=b.cancel_interval, cancel_pages=b.cancel_pages)
        running = running_server_exes(snap)
        if running != self._server_exes:
            self._server_exes = running
            self.bpf.set_exes(self._known | running)
        # One decision, two enforcers: the maps are compiled from the same verdicts the
        # user-space kill path uses (per tgid, also for cgroup rules: on cgroup v1 the
        # kernel's per-cgroup map never matches a memory cgroup; see dbguard.kernel.bpf).
        view = policy.kernel_view(snap)
        protected = {pid: (SHIELD | INHERIT if inherit else SHIELD, tier)
                     for pid, (inherit, tier) in view.protected.items()}
        starts = {pid: snap.procs[pid].start_time for pid in (*protected, *view.candidates) if pid in snap.procs}
        self.bpf.sync_processes(protected, view.candidates, starts=starts, judged=snap.procs.keys(),
                                cancel=view.cancel if b.cancel else frozenset())
        # The largest of them, for the kernel to kill when a task that may not be killed is stuck.
        listed = sorted((p for p in view.candidates if p in snap.procs), key=lambda p: -snap.procs[p].rss_bytes)
        self.bpf.set_listed_victims([(p, starts[p], view.candidates[p], snap.procs[p].comm) for p in listed])

    def is_server_exe(self, pid: int) -> bool:
        ident = exe_identity(f"/proc/{pid}/exe")
        return ident is not None and ident in (self._known | self._server_exes)

    def drain(self, daemon, snap: Snapshot, level: Level) -> list[BpfEvent]:
        """Read the kernel's events and answer each; returns them."""
        try:
            events = self.bpf.poll(0)
        except Exception as e:      # BCC errors must not stop the loop
            log.warning("BPF events not read: %s", e)
            return []
        for ev in events:
            if ev.kind == "birth":
                self._newborn(daemon, ev, snap, level)
                continue
            if ev.kind == "reclaim_fail":
                continue            # a wake-up: the cycle that follows reads the pressure
            rec = event_to_audit(ev)
            daemon.audit.write(rec)
            old = ev.detail.get("old_score_adj")
            if ev.kind == "score_tamper" and not daemon.dry_run and old is not None:
                daemon.executor.restore_score(ev.pid, old, f"restore the shield: {rec['reason']}", level, snap,
                                              start_time=ev.detail.get("start_time"))
            daemon.metrics.observe_kernel_event(METRIC_KIND.get(ev.kind, ev.kind),
                                                breach=ev.kind in ("breach", "score_tamper"))
        try:
            daemon.metrics.observe_bpf_counters(self.bpf.counters())
        except Exception as e:
            log.debug("BPF counters not read: %s", e)
        return events

    def _newborn(self, daemon, ev: BpfEvent, snap: Snapshot, level: Level) -> None:
        proc = read_proc(ev.pid)
        if proc is None or proc.kernel_thread or proc.pid == snap.self_pid or self.is_server_exe(proc.pid):
            return
        a = daemon.policy.newborn(proc, snap.self_pid, snap.memory.limit_bytes, daemon.state)
        if a is None:
            return
        one = Snapshot(ts=time.time(), memory=snap.memory, procs={proc.pid: proc}, roles={proc.pid: Role.OTHER},
                       databases=snap.databases, self_pid=snap.self_pid)
        daemon.executor.one(a, level, one)
