"""The sidecar loop: sense, assess, decide, act, keep the kernel's maps in step, and wait.

Everything that can fail because of the host or the config (audit file, cgroup, BPF,
metrics port, user names) fails in `open()`, with one line, before anything is changed.
After that, nothing in a cycle may stop protection: a database that stops answering is
reported and protection goes on without SQL. The one exception is the kernel path: it is
compiled beside the start and attached by a later cycle (kernel.attach), and with
`[bpf] enabled = true` its failure then stops the daemon.

Each watched scope (watch.py) is judged and answered on its own, with its own Policy; its
memory (PolicyState) lives in the watch: a SIGHUP or a newly discovered database swaps the
configuration and the Policies built from it, never the memory.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

from . import config as config_mod
from .act.executor import Executor
from .assess import Assessment, assess, judge, kill_still_needed, next_mark_bytes, recheck
from .audit import AuditLog
from .caches.base import AppCache
from .settings import Config
from .databases.base import Database
from .errors import DbguardError
from .host import lock_memory, one_malloc_arena, sd_notify, trim_heap, watchdog_interval
from .kernel.attach import KernelStart
from .metrics import Metrics
from .notices import DatabaseNotices
from .model import Action, ActionKind, Level, Outcome, Snapshot
from .policy import Policy
from .sensor import REDISCOVER_EVERY, Sensor, same_server_twice
from .sense.wakeups import wait_any
from .watch import Answer, Watch, build_policies, note_woken_by, wakeups, watching

log = logging.getLogger("dbguard")

# Under pressure the loop runs at least this often, PSI trigger or not.
PRESSED_INTERVAL = 0.2
# A graceful stop puts the DBA's cache settings back, one step at a time, within this budget
# (under systemd's default 90 s stop timeout; the unit's TimeoutStopSec says the same).
RESTORE_ON_STOP_SECONDS = 15.0
# Config tables a SIGHUP does not swap in (their connections and files are opened at start).
RESTART_ONLY = ("databases", "caches", "poolers", "audit", "metrics", "bpf")
# /healthz fails when the last completed cycle is older than this many intervals.
STALE_AFTER_INTERVALS = 5


class Daemon:
    def __init__(self, cfg: Config, *, dry_run: bool = False):
        self.cfg = cfg
        self.dry_run = dry_run or cfg.general.dry_run
        self.stopping = self.reload_requested = False
        self.bpf = self.feed = None
        self.kernel: KernelStart | None = None
        self.metrics: Metrics | None = None
        self.audit: AuditLog | None = None
        self.sensor: Sensor | None = None
        self.executor: Executor | None = None
        self._cycle_done_at: float | None = None
        self._cycle_began = 0.0         # time.monotonic(): the loop's pace is counted from here
        self._wake_r: int | None = None
        self._wake_fds: set[int] = set()
        self.snaps: list[Snapshot] = []   # the last cycle's, one per scope
        self.notices = DatabaseNotices()

    @property
    def watches(self) -> list[Watch]:
        return self.sensor.watches if self.sensor is not None else []

    @property
    def level(self) -> Level:
        """The highest level of any scope (what the kernel's kill gate and a stop record say)."""
        return max((w.level for w in self.watches), default=Level.OK)

    # --- start ---------------------------------------------------------------------------
    def open(self) -> None:
        cfg = self.cfg
        one_malloc_arena()      # before the first SQL call's worker thread
        for w in cfg.warnings:
            log.warning("config: %s", w)
        self.audit = AuditLog(cfg.audit.path)
        self.kernel = KernelStart(cfg)      # compiles in a child; a cycle attaches it (kernel.attach)
        self.sensor = Sensor(cfg)
        if not self.sensor.databases:
            log.warning("no [[databases]] configured and no local PostgreSQL or MySQL/MariaDB found; watching host memory "
                        "and looking again every %.0fs", REDISCOVER_EVERY)
        stats = self.sensor.collect()
        # Listed twice, a server's shrunk values would be saved as the DBA's by the second entry.
        twice = None if self.sensor.discovered else same_server_twice(
            [(s.name, s.server_pid, self.sensor.databases[s.name].server_key()) for s in stats])
        if twice:
            raise DbguardError(twice)
        for s in stats:
            if not s.up:
                log.warning("database %s: %s (protection goes on without SQL; server pid %s by fact)",
                            s.name, s.error, s.server_pid)
        self.notices.down = {s.name for s in stats if not s.up}      # said now: the loop says changes
        self.sensor.open_pressure(stats)
        log.info("%s", self.sensor.follow_processes())
        build_policies(cfg, self.sensor.watches, self.sensor.db_configs, self.dry_run)
        self.metrics = Metrics(cfg.metrics.listen, healthy=self.health)
        self.audit.on_error = self.metrics.observe_audit_error
        self.sensor.observe_collector = self.metrics.observe_collector
        self.executor = Executor(self.sensor.databases, self.audit, self.metrics.observe_action,
                                 recheck=self._recheck, caches=self.sensor.caches)
        self.memory_note = lock_memory() if cfg.general.lock_memory else "memory not locked (general.lock_memory)"
        self._set_protection()
        if not self.dry_run:
            self._recover()
        self.audit.write({"action": "start", "target": "dbguard", "level": "ok",
                          "reason": self.describe(), "result": "protecting" + (" (dry run)" if self.dry_run else ""),
                          "pid": os.getpid()})

    def _set_protection(self) -> None:
        cfg = self.cfg
        self.metrics.set_protection(bpf=self.bpf is not None, lower_scores=self.watches[0].policy.can_lower_scores
                                    and cfg.protection.lower_databases,
                                    raise_scores=cfg.protection.raise_candidates, kill=cfg.kill.enabled)

    def _attach_bpf(self) -> None:
        """The kernel path, ready in its child, taken over: its maps are brought in step by this
        cycle, its ring buffer wakes the loop, the protection gauge says so."""
        self.bpf = self.kernel.attach(self.audit, self.level.name.lower())
        if self.bpf is not None:
            from .kernel.feed import KernelFeed
            self.feed = KernelFeed(self.bpf, self.cfg, [w.cgroup for w in self.watches])
            self._set_protection()
        self._wake_fds = self._wakeup_fds()

    def _recover(self) -> None:
        """Settings a previous run left changed (it was killed half-way) are put back now: what
        needs no refill by recover(), the rest one step at a time, as at stop."""
        deadline = time.monotonic() + RESTORE_ON_STOP_SECONDS
        for name, db in self.sensor.databases.items():
            if self.executor.recover(name, self.level).carried_out:
                self._step_back(name, db, deadline, "left changed by a previous run of dbguard")
        for name, cache in self.sensor.caches.items():
            if self.executor.recover_cache(name, self.level).carried_out:
                self._step_back(name, cache, deadline, "left changed by a previous run of dbguard")

    def _recheck(self, a: Action) -> tuple[bool, str]:
        """Whether kill `a` is still needed, by the scope that decided it read again."""
        w = next((w for w in self.watches if w.name == a.scope), self.watches[0])
        return kill_still_needed(recheck(w.monitor.read(), self.cfg.pressure), self.cfg.pressure)

    def describe(self) -> str:
        dbs = ", ".join(f"{dc.kind} {dc.name}" for dc in self.sensor.db_configs) or "no database yet"
        if self.sensor.caches:
            dbs += "; caches and poolers: " + ", ".join(f"{c.kind} {n}" for n, c in self.sensor.caches.items())
        caps = "can lower database scores" if self.watches[0].policy.can_lower_scores else \
            "cannot lower database scores (no CAP_SYS_RESOURCE): candidates' scores are raised instead"
        return f"watching {watching(self.watches)}; databases: {dbs}; {self.kernel.describe()}; {caps}"

    def health(self) -> tuple[bool, str]:
        if self.sensor is None or not self.watches or self.stopping:
            return False, "not protecting"
        if self._cycle_done_at is not None:
            age = time.monotonic() - self._cycle_done_at
            stale = STALE_AFTER_INTERVALS * self.cfg.general.interval
            if age > stale:
                return False, f"loop stuck: last cycle completed {age:.0f}s ago (more than {stale:g}s)"
        if self.notices.degraded:
            # Still protecting (hogs are killed, every database server executable is shielded),
            # so not a failure: a restart would not identify the database either.
            return True, "degraded: " + " | ".join(self.notices.degraded.values())
        return True, "protection active: " + self.describe()

    # --- the loop ------------------------------------------------------------------------
    def cycle(self) -> list[Answer]:
        """Every scope read, judged and answered on its own (one process table, one round of SQL)."""
        self._cycle_began = time.monotonic()
        if self.kernel is not None and self.kernel.ready():
            self._attach_bpf()
        if self.sensor.update_scopes():          # a database found since, a pod gone
            self._put_back_scores(self.sensor.dropped, "scope no longer watched")
            self.sensor.dropped = []
            build_policies(self.cfg, self.sensor.watches, self.sensor.db_configs, self.dry_run)
            self.executor.databases = self.sensor.databases
            if self.feed is not None:
                self.feed.rescope(self.cfg, [w.cgroup for w in self.watches])
        readings, before = [w.monitor.read() for w in self.watches], [w.level for w in self.watches]
        # Under pressure every process in the scope is read afresh; at rest the table is
        # kept up at a pace that does not grow with the number of processes.
        fresh = [max(b, judge(r, self.cfg.pressure)[0]) >= Level.WARN for b, r in zip(before, readings)]
        self.snaps, now = self.sensor.snapshots(readings, fresh), time.time()
        # Judged with what the sessions have allocated and not yet touched (the snapshot's
        # reading): a dozen sorts that asked for more than the scope holds are pressure before
        # the kernel has charged it.
        judged = [assess(s.memory, self.cfg.pressure, w.state.levels, now) for w, s in zip(self.watches, self.snaps)]
        answers = [self._answer(*x) for x in zip(self.watches, before, judged, self.snaps)]
        self._sync_bpf([(x.watch.policy, x.snap) for x in answers])
        self.metrics.observe_scopes([(x.snap, x.assessment.level) for x in answers])
        self.notices.note(tuple(db for x in answers for db in x.snap.databases))
        self._cycle_done_at = time.monotonic()
        return answers

    def _answer(self, w: Watch, before: Level, a: Assessment, snap: Snapshot) -> Answer:
        if a.level != before:
            self._audit_level(w, before, a)
        plan = w.policy.decide(snap, a, w.state)
        for action, outcome in self.executor.execute(plan, snap):
            w.policy.learn(w.state, action, outcome)
        for target, why in w.newly_deferred(plan).items():      # once when it starts, not every cycle
            log.info("put off %s: %s", target, why)
        if rec := w.ooms.check(w.cgroup, w.monitor.version, a.level.name.lower()):
            self.audit.write(rec)          # the kernel's own OOM kill count rose in this scope
        return Answer(w, snap, a, plan)

    def _audit_level(self, w: Watch, before: Level, a: Assessment) -> None:
        m = a.reading
        self.audit.write({"action": "level_change", "target": w.name, "scope": w.name,
                          "reason": a.why, "level": a.level.name.lower(),
                          "result": f"{before.name.lower()} -> {a.level.name.lower()}",
                          "usage_bytes": m.usage_bytes, "limit_bytes": m.limit_bytes,
                          "reclaimable_bytes": m.reclaimable_bytes, "pending_bytes": m.pending_bytes,
                          "psi_some_avg10": m.psi_some_avg10, "woken_by": list(w.woken_by)})

    def _sync_bpf(self, answered: list[tuple[Policy, Snapshot]]) -> None:
        if self.feed is None:
            return
        try:
            self.feed.sync(answered, self.level, self.cfg, self.dry_run,
                           levels={w.cgroup: w.level for w in self.watches})
        except Exception as e:     # a map full or a BCC error must not stop the user-space path
            log.warning("BPF sync failed: %s", e)
        self.feed.drain(self)     # read even when the sync failed

    def _wait(self, answers: list[Answer]) -> None:
        interval = self.cfg.general.interval
        if any(x.assessment.pressed for x in answers):
            # Pressure now (not a level merely held by dwell): look often. Kernel events (PSI,
            # usage thresholds) wake the wait at once either way.
            interval = min(interval, PRESSED_INTERVAL)
        watchdog = watchdog_interval()
        if watchdog is not None:
            interval = min(interval, watchdog)
        for x in answers:
            # Wake at the next mark above what the reading justifies now (not above a level only
            # held by dwell): pressure coming back is seen at once.
            x.watch.arm(next_mark_bytes(x.assessment.reading, x.assessment.now, self.cfg.pressure))
        monitors = [w.monitor for w in self.watches]
        # From the cycle's start: one every `interval` while a cycle costs less, and throttling
        # at a memory.high alone wakes no more often than the pressed pace.
        deadline, pace = self._cycle_began + interval, self._cycle_began + PRESSED_INTERVAL
        while fired := wait_any(monitors, max(0.0, deadline - time.monotonic()), self._wake_fds, pace):
            self._drain_signals()
            # Woken by the kernel's ring buffer alone: births are scored now, without a cycle;
            # anything else (a kill, a failing reclaim, a signal, pressure) is a cycle's work.
            if fired != {"fd"} or self.stopping or self.reload_requested or self.feed is None or not self.snaps:
                break
            events = self.feed.drain(self)
            if not events or any(ev.kind != "birth" for ev in events):     # nothing read: never spin
                break
        note_woken_by(self.watches, fired)
        self._drain_signals()

    def _wakeup_fds(self) -> set[int]:
        """Besides the scopes' own: the signal pipe, the kernel path's child while it works, then
        the BPF programs' ring buffer (births, failing reclaim, kills)."""
        ring = self.bpf.wake_fd() if self.bpf is not None else None
        if ring is not None:
            log.info("also woken by the BPF programs' events (births, failing reclaim, kills)")
        return {fd for fd in (self._wake_r, self.kernel.fileno() if self.kernel else None, ring) if fd is not None}

    def _drain_signals(self) -> None:
        if self._wake_r is not None:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def catch_signals(self) -> None:
        """Before open(): a SIGHUP or SIGTERM during the start (even just after the "protecting"
        record) is kept for the loop, not the default action's end of the process. A signal
        wakes the wait at once (set_wakeup_fd writes to this pipe, which the wait polls)."""
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def run(self) -> int:
        self._wake_fds = self._wakeup_fds()
        log.info("dbguard started: %s; %s", self.describe(), self.memory_note)
        for w in self.watches:
            log.info("scope %s: %s", w.name, wakeups(w, self.cfg.general.interval))
        sd_notify("READY=1")
        while not self.stopping:
            if self.reload_requested:
                self.reload()
            answers = self.cycle()
            sd_notify("WATCHDOG=1")
            if self.stopping:
                break
            if not any(x.assessment.pressed for x in answers):
                trim_heap()
            self._wait(answers)
        sd_notify("STOPPING=1")
        return 0

    def _on_stop(self, signum, _frame) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        self.stopping = True

    def _on_hup(self, _signum, _frame) -> None:
        self.reload_requested = True

    def reload(self) -> None:
        """SIGHUP: thresholds, kill and protection rules apply at once; the rest needs a restart.
        The audit log is reopened at its path.
        The policy's memory (rates, escalations, dwell, the level) carries over."""
        self.reload_requested = False
        self.audit.reopen()         # after logrotate (debian/dbguard.logrotate) moved the file
        if not self.cfg.source:
            log.info("SIGHUP: no config file to reload (started without --config)")
            return
        try:
            new = config_mod.load(self.cfg.source)
        except DbguardError as e:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", e)
            return
        fixed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(self.cfg, name)]
        if new.pressure.cgroup != self.cfg.pressure.cgroup:
            fixed.append("pressure.cgroup")
        if new.general.state_dir != self.cfg.general.state_dir:
            fixed.append("general.state_dir")
        keep = {name: getattr(self.cfg, name) for name in RESTART_ONLY}
        new = dataclasses.replace(new, **keep, pressure=dataclasses.replace(new.pressure, cgroup=self.cfg.pressure.cgroup),
                                  general=dataclasses.replace(new.general, state_dir=self.cfg.general.state_dir))
        self.cfg = new
        self.dry_run = new.general.dry_run or self.dry_run
        build_policies(new, self.sensor.watches, self.sensor.db_configs, self.dry_run)
        self.audit.write({"action": "reload", "target": "dbguard", "level": self.level.name.lower(),
                          "reason": "SIGHUP", "result": "config reloaded" + (
                              f"; restart to apply changes to {', '.join(fixed)}" if fixed else "")})

    # --- stop ----------------------------------------------------------------------------
    def close(self) -> None:
        self.stopping = True
        if self.executor is not None and not self.dry_run:
            self._put_back_scores(self.watches)
            self._restore_caches()
        if self.kernel is not None:
            self.kernel.close()
        if self.bpf is not None:
            self.bpf.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.audit is not None:
            self.audit.write({"action": "stop", "target": "dbguard", "level": self.level.name.lower(),
                              "reason": "stopped", "result": "stopped"})
            self.audit.close()
        if self.sensor is not None:
            self.sensor.close()

    def _put_back_scores(self, watches: list[Watch], why: str = "dbguard stopping") -> None:
        """The scores raised in these scopes, back (at stop; for a scope dropped while running:
        no other scope's policy knows them, so they would stay raised)."""
        if not any(w.state.scored for w in watches):
            return
        try:
            snap = self.sensor.processes()
        except Exception as e:      # stopping (or the loop) must go on: say it and leave the scores
            log.warning("scores not put back (%s): %s", why, e)
            return
        for w in (w for w in watches if w.policy is not None):
            for a in w.policy.on_stop(snap, w.state, why):
                self.executor.one(a, self.level, snap)

    def _restore_caches(self) -> None:
        """Put the DBA's settings back one step at a time (a buffer pool refills gradually),
        through act/ like every change; a database that cannot be reached is said so too."""
        deadline = time.monotonic() + RESTORE_ON_STOP_SECONDS
        for name, db in [*self.sensor.databases.items(), *self.sensor.caches.items()]:
            self._step_back(name, db, deadline, "dbguard stopping: put the DBA's settings back")

    def _step_back(self, name: str, db: Database | AppCache, deadline: float, reason: str) -> None:
        """Databases, caches and poolers alike: one step at a time (a cache refills gradually)."""
        cache = isinstance(db, AppCache)
        while True:
            s = db.collect()
            if s.shrink_step == 0:
                break
            a = Action(ActionKind.RESTORE_CACHE, reason, target=f"{db.kind} {name}", value=s.shrink_step - 1,
                       **({"cache": name} if cache else {"database": name}))
            if not s.up or time.monotonic() >= deadline:
                why = f"{'server' if cache else 'database'} unreachable ({s.error})" if not s.up else \
                    f"out of time ({RESTORE_ON_STOP_SECONDS:g}s) at step {s.shrink_step}"
                self.executor.record(a, self.level, Outcome.failed(
                    f"not restored: {why}; the originals stay in {self.cfg.general.state_dir} and are put "
                    "back at the next start"))
                break
            if not self.executor.one(a, self.level).ok:
                break
