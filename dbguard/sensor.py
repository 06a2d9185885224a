"""Sense: databases, the watched memory scope and the process table, read into one Snapshot.

What `run` and `explain` both read from. Reading never changes anything, and nothing here
may stall the loop: every database call is bounded, a database that stops answering is
reported and the snapshot goes on without its SQL facts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time

from .caches import registry as caches_registry
from .caches.base import AppCache
from .classify import Classifier, classify
from .config import Config, DatabaseConfig
from .databases import registry
from .databases.base import Database
from .errors import DbguardError
from .model import CacheStats, MemoryReading, Snapshot
from .sense.pressure import PressureMonitor
from .sense.procfs import CGROUP_ROOT, read_procs
from .sense.procevents import open_events
from .sense.proctable import ProcTable, scope_members
from .sense.scope import Scope, configured, scope_of, unwatched

log = logging.getLogger("dbguard")
# One count for every sensor of the process: a snapshot's `since` names only its own sensor's last.
SNAPSHOTS = itertools.count(1)

REDISCOVER_EVERY = 30.0


def make_database(cfg: DatabaseConfig, state_dir: str) -> Database:
    return registry.make(cfg, state_dir)


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


def same_server_twice(entries: list[tuple[str, int | None, dict[str, str] | None]]) -> str | None:
    """One line naming two [[databases]] entries that reach the same server, None when none do.

    `entries`: (name, server pid found by fact, server key learnt over SQL) each. The same live
    server process is one server; so are two complete, equal keys (a key with a fact missing,
    such as a data directory the role may not read, could be a primary and its standby, which
    share a system_identifier: no verdict on it)."""
    for i, (a, pid_a, key_a) in enumerate(entries):
        for b, pid_b, key_b in entries[i + 1:]:
            if pid_a is not None and pid_a == pid_b:
                fact = f"server pid {pid_a}"
            elif key_a and key_a == key_b and all(key_a.values()):
                fact = ", ".join(f"{k} {v}" for k, v in sorted(key_a.items()))
            else:
                continue
            return (f"databases: {a} and {b} reach the same server ({fact}); list each server once, "
                    "or its originals would be saved twice and one entry's shrunk values kept as the DBA's")
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
        # [[caches]] and [[poolers]]: names are unique across both (validate.py)
        self.caches: dict[str, AppCache] = {c.name: caches_registry.make(c, "caches", cfg.general.state_dir)
                                            for c in cfg.caches}
        self.caches.update({c.name: caches_registry.make(c, "poolers", cfg.general.state_dir) for c in cfg.poolers})
        self._caches_up: dict[str, bool] = {}
        self._discovered_at = time.monotonic()
        self.pressure: PressureMonitor | None = None
        self.scope: Scope | None = None
        self.cgroup = ""
        self.table = ProcTable()
        self.classifier = Classifier()
        self._seq = -1          # the number of this sensor's last snapshot
        self.observe_collector = lambda source, ok, seconds: None

    def _discover(self) -> tuple[DatabaseConfig, ...]:
        found = tuple(registry.discover())
        for dc in found:
            log.info("discovered %s %s (%s)", dc.kind, dc.name, dc.dsn)
        return found

    def rediscover(self) -> list[str]:
        """With no [[databases]]: pick up database servers that started since. Names added."""
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
        """Watch the scope that can run out: [pressure] cgroup when set, else where the limit
        that applies to the (first identified) database server really is (sense/scope.py)."""
        p = self.cfg.pressure
        if p.cgroup:
            self.scope = configured(p.cgroup)
        else:
            server = next((s.server_pid for s in stats if s.server_pid), None)
            self.scope = scope_of(server) if server else Scope(
                "", None, "no database server identified yet: watching the host's RAM")
            missed = unwatched(self.scope, self._scopes(stats))
            if missed:
                log.warning("%s", missed)
                self.scope = dataclasses.replace(self.scope, why=f"{self.scope.why}; {missed}")
        self.cgroup = self.scope.cgroup_dir if relative_memcg(self.scope.cgroup_dir) is not None else ""
        self.pressure = PressureMonitor(self.cgroup or None, trigger_stall_us=p.psi_trigger_stall_us,
                                        trigger_window_us=p.psi_trigger_window_us)

    @staticmethod
    def _scopes(stats: list) -> dict[str, Scope]:
        """The scope each identified server's own limit makes (a server gone meanwhile: none)."""
        out = {}
        for s in stats:
            if s.server_pid:
                with contextlib.suppress(DbguardError, OSError):
                    out[s.name] = scope_of(s.server_pid)
        return out

    def collect(self) -> list:
        stats = []
        for db in list(self.databases.values()):
            t0 = time.monotonic()
            s = db.collect()
            self.observe_collector(f"{db.kind}:{db.name}", s.up, time.monotonic() - t0)
            stats.append(s)
        return stats

    def collect_caches(self) -> list[CacheStats]:
        stats = []
        for c in list(self.caches.values()):
            t0 = time.monotonic()
            s = c.collect()
            self.observe_collector(f"{c.kind}:{c.name}", s.up, time.monotonic() - t0)
            if s.up != self._caches_up.get(c.name, True):      # said when it changes, not every cycle
                if s.up:
                    log.info("%s %s answers again", c.kind, c.name)
                else:
                    log.warning("%s (protection goes on without it)", s.error)
            self._caches_up[c.name] = s.up
            stats.append(s)
        return stats

    def processes(self) -> Snapshot:
        """The process table alone (no SQL, no pressure reading): for what is undone at stop."""
        procs = read_procs()
        reading = MemoryReading(cgroup=self.cgroup, cgroup_version=0, usage_bytes=0, limit_bytes=None,
                                psi_some_avg10=0.0, psi_full_avg10=0.0)
        return Snapshot(ts=time.time(), memory=reading, procs=procs, roles=classify(procs, [], self.self_pid),
                        databases=(), self_pid=self.self_pid)

    def follow_processes(self) -> str:
        """For a long run: learn births and exits from the kernel instead of listing /proc."""
        self.table.events = open_events()
        return ("process events from the kernel (netlink process connector)" if self.table.events
                else "process connector unavailable here: /proc listed each cycle")

    def reading(self) -> MemoryReading:
        return self.pressure.read()

    def snapshot(self, reading: MemoryReading | None = None, fresh: bool = True) -> Snapshot:
        """One Snapshot. `fresh`: every process of the watched scope read this cycle (under
        pressure, and for one-shot callers); otherwise the table is refreshed at rest's pace
        (sense/proctable.py)."""
        reading = reading or self.reading()
        t0 = time.monotonic()
        members = scope_members(self.cgroup) if fresh and self.cgroup else None
        procs = self.table.refresh(fresh, members, relative_memcg(self.cgroup) if members is not None else None)
        self.observe_collector("procfs", True, time.monotonic() - t0)
        stats = self.collect()
        caches = self.collect_caches()
        read = self.table.take_changed()
        roles = self.classifier.update(procs, stats, self.self_pid, caches, read)
        seq, since = next(SNAPSHOTS), self._seq
        self._seq = seq
        pending = sum(db.pending_bytes for db in stats if db.up)
        if pending:
            reading = dataclasses.replace(reading, pending_bytes=pending)
        return Snapshot(ts=time.time(), memory=reading, procs=procs, roles=roles, databases=tuple(stats),
                        self_pid=self.self_pid, caches=tuple(caches), seq=seq, since=since,
                        changed=frozenset(read | self.classifier.changed))

    def close(self) -> None:
        for db in [*self.databases.values(), *self.caches.values()]:
            try:
                db.close()
            except Exception as e:   # closing must not hide the reason we stop
                log.warning("closing %s: %s", db.name, e)
        if self.pressure is not None:
            self.pressure.close()
        if self.table.events is not None:
            self.table.events.close()
            self.table.events = None
