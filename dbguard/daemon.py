"""The sidecar loop: sense, decide, act, keep the kernel's maps in step, and wait.

Everything that can fail because of the host or the config (audit file, cgroup, BPF,
metrics port, user names) fails in `open()`, with one line, before anything is changed.
After that, nothing in a cycle may stop protection: a database that stops answering is
reported and protection goes on without SQL.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pwd
import signal
import time
from typing import Any

from . import config as config_mod
from .act.executor import Executor
from .audit import AuditLog
from .classify import classify
from .config import Config, DatabaseConfig
from .databases.base import Database
from .errors import ConfigError, DbguardError
from .metrics import Metrics
from .model import ActionKind, Level, Plan, Snapshot
from .policy import Policy, level_of
from .sense.pressure import PressureMonitor
from .sense.procfs import CGROUP_ROOT, own_memcg_dir, read_procs, read_pss

log = logging.getLogger("dbguard")

CAP_SYS_RESOURCE = 24
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
# Under pressure the loop runs at least this often, PSI trigger or not.
PRESSED_INTERVAL = 0.2
REDISCOVER_EVERY = 30.0
# A graceful stop puts the DBA's cache settings back; MySQL grows one step per call.
RESTORE_ON_STOP_SECONDS = 15.0


def has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def lock_memory() -> str:
    """mlockall so dbguard never waits on reclaim itself; ONFAULT locks only pages it touches."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        return f"memory not locked: mlockall failed ({os.strerror(ctypes.get_errno())}); needs CAP_IPC_LOCK"
    return "memory locked (mlockall, on fault)"


def make_database(cfg: DatabaseConfig, state_dir: str) -> Database:
    if cfg.kind == "postgresql":
        from .databases.postgresql import PostgreSQL
        return PostgreSQL(cfg, state_dir)
    from .databases.mysql import MySQL
    return MySQL(cfg, state_dir)


def resolve_users(names: tuple[str, ...]) -> frozenset[int]:
    uids = set()
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ConfigError(f"kill.protect_users: no user named {name!r} on this host") from None
    return frozenset(uids)


def resolve_rule_users(cfg: Config) -> dict[str, int]:
    """User names in [[policy.rules]] -> uid; a name unknown here fails at start, in one line."""
    uids = {}
    for i, rule in enumerate(cfg.policy.rules):
        for name in rule.user:
            if name.isdigit() or name in uids:
                continue
            try:
                uids[name] = pwd.getpwnam(name).pw_uid
            except KeyError:
                raise ConfigError(f"policy.rules[{i}].user: no user named {name!r} on this host") from None
    return uids


def relative_memcg(cgroup_dir: str) -> str | None:
    """The /proc/PID/cgroup form of a cgroup directory; None for the host (every process)."""
    if not cgroup_dir:
        return None
    for base in (f"{CGROUP_ROOT}/memory", f"{CGROUP_ROOT}/unified", CGROUP_ROOT):
        if cgroup_dir == base:
            return None
        if cgroup_dir.startswith(base + "/"):
            return cgroup_dir[len(base):]
    return None


class Sensor:
    """Databases plus the pressure monitor: what `run` and `explain` both read from."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.self_pid = os.getpid()
        self.discovered = not cfg.databases and cfg.general.discover
        self.db_configs: tuple[DatabaseConfig, ...] = cfg.databases or (
            self._discover() if self.discovered else ())
        os.makedirs(cfg.general.state_dir, mode=0o700, exist_ok=True)
        self.databases: dict[str, Database] = {}
        for dc in self.db_configs:
            self.databases[dc.name] = make_database(dc, cfg.general.state_dir)
        self._discovered_at = time.monotonic()
        self.pressure: PressureMonitor | None = None
        self.cgroup = ""
        self.observe_collector = lambda source, ok, seconds: None

    def _discover(self) -> tuple[DatabaseConfig, ...]:
        from .databases.discover import discover_postgresql
        found = tuple(discover_postgresql())
        for dc in found:
            log.info("discovered PostgreSQL %s (%s)", dc.name, dc.dsn)
        return found

    def rediscover(self) -> list[str]:
        """With no [[databases]]: pick up PostgreSQL servers that started since. Names added."""
        if not self.discovered or time.monotonic() - self._discovered_at < REDISCOVER_EVERY:
            return []
        self._discovered_at = time.monotonic()
        added = []
        for dc in self._discover():
            if dc.name not in self.databases:
                self.databases[dc.name] = make_database(dc, self.cfg.general.state_dir)
                self.db_configs += (dc,)
                added.append(dc.name)
        return added

    def open_pressure(self, stats: list) -> None:
        p = self.cfg.pressure
        cgroup = p.cgroup
        if not cgroup:
            server = next((s.server_pid for s in stats if s.server_pid), None)
            cgroup = own_memcg_dir(server) if server else ""
            if relative_memcg(cgroup) is None:
                cgroup = ""        # the root cgroup: watch the host
        self.cgroup = cgroup.rstrip("/")
        self.pressure = PressureMonitor(self.cgroup or None, trigger_stall_us=p.psi_trigger_stall_us,
                                        trigger_window_us=p.psi_trigger_window_us)

    def collect(self) -> list:
        stats = []
        for db in list(self.databases.values()):
            t0 = time.monotonic()
            s = db.collect()
            self.observe_collector(f"{db.kind}:{db.name}", s.up, time.monotonic() - t0)
            stats.append(s)
        return stats

    def snapshot(self) -> Snapshot:
        reading = self.pressure.read()
        t0 = time.monotonic()
        procs = read_procs()
        self.observe_collector("procfs", True, time.monotonic() - t0)
        stats = self.collect()
        roles = classify(procs, stats, self.self_pid)
        return Snapshot(ts=time.time(), memory=reading, procs=procs, roles=roles, databases=tuple(stats),
                        self_pid=self.self_pid)

    def close(self) -> None:
        for db in self.databases.values():
            try:
                db.close()
            except Exception as e:   # closing must not hide the reason we stop
                log.warning("closing %s: %s", db.name, e)
        if self.pressure is not None:
            self.pressure.close()


def make_policy(cfg: Config, sensor: Sensor, dry_run: bool) -> Policy:
    full = dataclasses.replace(cfg, databases=sensor.db_configs)
    return Policy(full, dry_run=dry_run, can_lower_scores=has_capability(CAP_SYS_RESOURCE),
                  protected_uids=resolve_users(cfg.kill.protect_users),
                  watched_memcg=relative_memcg(sensor.cgroup), rule_uids=resolve_rule_users(cfg),
                  pss_reader=read_pss)


class Daemon:
    def __init__(self, cfg: Config, *, dry_run: bool = False):
        self.cfg = cfg
        self.dry_run = dry_run or cfg.general.dry_run
        self.stopping = False
        self.reload_requested = False
        self.bpf = None
        self.bpf_note = ""
        self.metrics: Metrics | None = None
        self.audit: AuditLog | None = None
        self.sensor: Sensor | None = None
        self.level = Level.OK
        self._held: set[str] = set()         # targets whose held-back action was logged
        self._threshold: int | None = None

    # --- start ---------------------------------------------------------------------------
    def open(self) -> None:
        cfg = self.cfg
        resolve_users(cfg.kill.protect_users)       # a bad user name fails before anything starts
        resolve_rule_users(cfg)
        for w in cfg.warnings:
            log.warning("config: %s", w)
        self.audit = AuditLog(cfg.audit.path)
        self.sensor = Sensor(cfg)
        if not self.sensor.databases:
            log.warning("no [[databases]] configured and no local PostgreSQL found; watching host memory "
                        "and looking again every %.0fs", REDISCOVER_EVERY)
        stats = self.sensor.collect()
        for s in stats:
            if not s.up:
                log.warning("database %s: %s (protection goes on without SQL)", s.name, s.error)
        self.sensor.open_pressure(stats)
        self.policy = make_policy(cfg, self.sensor, self.dry_run)
        self.metrics = Metrics(cfg.metrics.listen, healthy=self.health)
        self.sensor.observe_collector = self.metrics.observe_collector
        self._open_bpf()
        self.executor = Executor(self.sensor.databases, self.audit, self.metrics.observe_action,
                                 still_pressed=self._relieved)
        self.memory_note = lock_memory() if cfg.general.lock_memory else "memory not locked (general.lock_memory)"
        self.metrics.set_protection(bpf=self.bpf is not None, lower_scores=self.policy.can_lower_scores
                                    and cfg.protection.lower_databases,
                                    raise_scores=cfg.protection.raise_candidates, kill=cfg.kill.enabled)
        if not self.dry_run:
            self._recover()
        self.audit.write({"action": "start", "target": "dbguard", "level": "ok",
                          "reason": self.describe(), "result": "protecting" + (" (dry run)" if self.dry_run else ""),
                          "pid": os.getpid()})

    def _open_bpf(self) -> None:
        enabled = self.cfg.bpf.enabled
        if enabled is False:
            self.bpf_note = "BPF path off ([bpf] enabled = false)"
            return
        from .kernel.bpf import BpfGuard
        try:
            self.bpf = BpfGuard.load(max_procs=self.cfg.bpf.max_procs, max_cgroups=self.cfg.bpf.max_cgroups)
            self.bpf_note = "BPF path active"
        except DbguardError as e:
            if enabled is True:
                raise DbguardError(f"{e} ([bpf] enabled = true requires it)") from None
            self.bpf_note = f"running on the user-space path alone: {e}"
            log.warning("%s", self.bpf_note)

    def _recover(self) -> None:
        for name, db in self.sensor.databases.items():
            out = db.recover()
            if not out.ok or out.detail and "nothing" not in out.detail.lower():
                log.info("recover %s: %s", name, out.detail)

    def _relieved(self) -> str | None:
        """None while a kill is still justified (high level, marks minus hysteresis), else why not."""
        level, why = level_of(self.sensor.pressure.read(), self.cfg.pressure, margin=self.cfg.pressure.hysteresis)
        return None if level >= Level.HIGH else why

    def describe(self) -> str:
        dbs = ", ".join(f"{dc.kind} {dc.name}" for dc in self.sensor.db_configs) or "no database yet"
        where = self.sensor.cgroup or "host memory"
        caps = "can lower database scores" if self.policy.can_lower_scores else \
            "cannot lower database scores (no CAP_SYS_RESOURCE): candidates' scores are raised instead"
        return f"watching {where}; databases: {dbs}; {self.bpf_note}; {caps}"

    def health(self) -> tuple[bool, str]:
        ok = self.sensor is not None and self.sensor.pressure is not None and not self.stopping
        return ok, ("protection active: " + self.describe()) if ok else "not protecting"

    # --- the loop ------------------------------------------------------------------------
    def cycle(self) -> tuple[Snapshot, Plan]:
        for name in self.sensor.rediscover():
            log.info("now protecting PostgreSQL %s", name)
            self.policy = make_policy(self.cfg, self.sensor, self.dry_run)
            self.executor.databases = self.sensor.databases
        snap = self.sensor.snapshot()
        plan = self.policy.decide(snap)
        if plan.level != self.level:
            m = snap.memory
            self.audit.write({"action": "level_change", "target": self.sensor.cgroup or "host",
                              "reason": plan.level_reason, "level": plan.level.name.lower(),
                              "result": f"{self.level.name.lower()} -> {plan.level.name.lower()}",
                              "usage_bytes": m.usage_bytes, "limit_bytes": m.limit_bytes,
                              "reclaimable_bytes": m.reclaimable_bytes, "psi_some_avg10": m.psi_some_avg10})
            self.level = plan.level
        for action, rec in zip(plan.actions, self.executor.execute(plan, snap)):
            if action.kind is ActionKind.KILL and str(rec.get("result", "")).startswith("skipped"):
                self.policy.kill_not_done(action)   # it may be next again: the tier order holds
        held = dict(plan.held)
        for target in held.keys() - self._held:          # once when it starts, not every cycle
            log.info("held back %s: %s", target, held[target])
        self._held = set(held)
        self._sync_bpf(snap, plan.level)
        self.metrics.observe_snapshot(snap, plan.level)
        return snap, plan

    def _sync_bpf(self, snap: Snapshot, level: Level) -> None:
        if self.bpf is None:
            return
        from .kernel.bpf import INHERIT, SHIELD, event_to_audit, restore_score
        b = self.cfg.bpf
        # One decision, two enforcers: the maps are compiled from the same verdicts the
        # user-space kill path uses (per tgid, also for cgroup rules: on cgroup v1 the
        # kernel's per-cgroup map never matches a memory cgroup; see dbguard.kernel.bpf).
        view = self.policy.kernel_view(snap)
        protected = {pid: (SHIELD | INHERIT if inherit else SHIELD, tier)
                     for pid, (inherit, tier) in view.protected.items()}
        candidates = view.candidates
        try:
            self.bpf.set_policy(level=int(level), enabled=self.cfg.kill.enabled, dry_run=self.dry_run,
                                min_level_to_kill=b.min_level_to_kill, fail_streak=b.fail_streak,
                                fail_pages=b.fail_pages)
            self.bpf.sync_processes(protected, candidates)
            events = self.bpf.poll(0)
        except Exception as e:     # a map full or a BCC error must not stop the user-space path
            log.warning("BPF sync failed: %s", e)
            return
        for ev in events:
            rec = event_to_audit(ev)
            if ev.kind == "score_tamper" and not self.dry_run:
                rec["result"] += "; " + restore_score(ev)
            self.audit.write(rec)
            kind = {"kill": "bpf_kill", "would_kill": "bpf_would_kill", "oom_victim": "oom_kill",
                    "breach": "oom_kill"}.get(ev.kind, ev.kind)
            self.metrics.observe_kernel_event(kind, breach=ev.kind in ("breach", "score_tamper"))

    def _wait(self, reading) -> None:
        pressed = self.level > Level.OK
        interval = min(self.cfg.general.interval, PRESSED_INTERVAL) if pressed else self.cfg.general.interval
        mark = self.policy.levels.next_mark_bytes(reading)
        if mark != self._threshold:
            self.sensor.pressure.set_usage_threshold(mark)
            self._threshold = mark
        self.sensor.pressure.wait(interval)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        log.info("dbguard started: %s; %s", self.describe(), self.memory_note)
        p = self.sensor.pressure
        log.info("wake-ups: %s", f"PSI trigger '{p.trigger_spec}' on {p.psi_path}" if p.trigger_active
                 else f"no PSI trigger ({p.trigger_error}); polling every {self.cfg.general.interval:g}s")
        if p.trigger_note:
            log.info("%s", p.trigger_note)
        while not self.stopping:
            if self.reload_requested:
                self.reload()
            snap, _ = self.cycle()
            if self.stopping:
                break
            self._wait(snap.memory)
        return 0

    def _on_stop(self, signum, _frame) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        self.stopping = True

    def _on_hup(self, _signum, _frame) -> None:
        self.reload_requested = True

    def reload(self) -> None:
        """SIGHUP: thresholds, kill and protection rules apply at once; the rest needs a restart."""
        self.reload_requested = False
        if not self.cfg.source:
            log.info("SIGHUP: no config file to reload (started without --config)")
            return
        try:
            new = config_mod.load(self.cfg.source)
            resolve_users(new.kill.protect_users)
            resolve_rule_users(new)
        except DbguardError as e:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", e)
            return
        fixed = [name for name in ("databases", "audit", "metrics", "bpf")
                 if getattr(new, name) != getattr(self.cfg, name)]
        if new.pressure.cgroup != self.cfg.pressure.cgroup:
            fixed.append("pressure.cgroup")
        if new.general.state_dir != self.cfg.general.state_dir:
            fixed.append("general.state_dir")
        keep = {name: getattr(self.cfg, name) for name in ("databases", "audit", "metrics", "bpf")}
        new = dataclasses.replace(new, **keep, pressure=dataclasses.replace(new.pressure, cgroup=self.cfg.pressure.cgroup),
                                  general=dataclasses.replace(new.general, state_dir=self.cfg.general.state_dir))
        levels = self.policy.levels
        self.cfg = new
        self.dry_run = new.general.dry_run or self.dry_run
        self.policy = make_policy(new, self.sensor, self.dry_run)
        self.policy.levels = dataclasses.replace(levels, pressure=new.pressure)
        self.audit.write({"action": "reload", "target": "dbguard", "level": self.level.name.lower(),
                          "reason": "SIGHUP", "result": "config reloaded" + (
                              f"; restart to apply changes to {', '.join(fixed)}" if fixed else "")})

    # --- stop ----------------------------------------------------------------------------
    def close(self) -> None:
        self.stopping = True
        if self.sensor is not None and not self.dry_run:
            self._restore_caches()
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

    def _restore_caches(self) -> None:
        deadline = time.monotonic() + RESTORE_ON_STOP_SECONDS
        for name, db in self.sensor.databases.items():
            while time.monotonic() < deadline:
                s = db.collect()
                if not s.up or s.shrink_step == 0:
                    break
                out = db.set_shrink_step(0)
                if self.audit is not None:
                    self.audit.write({"action": "restore_cache", "target": f"{db.kind} {name}",
                                      "database": name, "level": self.level.name.lower(),
                                      "reason": "dbguard stopping: put the DBA's settings back",
                                      "result": out.detail if out.ok else f"failed: {out.detail}", "ok": out.ok})
                if not out.ok:
                    break


def explain(cfg: Config) -> dict[str, Any]:
    """One snapshot and the plan the policy would carry out now, without acting."""
    sensor = Sensor(cfg)
    try:
        sensor.open_pressure(sensor.collect())
        policy = make_policy(cfg, sensor, dry_run=True)
        snap = sensor.snapshot()
        plan = policy.decide(snap)
        return {"snapshot": snap, "plan": plan, "policy": policy, "cgroup": sensor.cgroup}
    finally:
        sensor.close()
