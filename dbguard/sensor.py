"""Sense: databases, the watched memory scopes and the process table, read into one Snapshot
per scope.

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
from .settings import Config, DatabaseConfig
from .databases import registry
from .databases.base import Database
from .errors import DbguardError
from .model import CacheStats, MemoryReading, Snapshot
from .sense.pressure import PressureMonitor
from .sense.procfs import read_procs
from .sense.procevents import open_events
from .sense.proctable import ProcTable, scope_members
from .sense.scope import Scope, configured, group, held, relative_memcg, scope_of, unwatched
from .watch import Watch

__all__ = ["Sensor", "REDISCOVER_EVERY", "relative_memcg", "same_server_twice"]

log = logging.getLogger("dbguard")
# One count for every sensor of the process: a snapshot's `since` names only its own sensor's last.
SNAPSHOTS = itertools.count(1)

REDISCOVER_EVERY = 30.0


def make_database(cfg: DatabaseConfig, state_dir: str) -> Database:
    return registry.make(cfg, state_dir)


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


def pending(reading: MemoryReading, stats) -> MemoryReading:
    """The reading with what its databases' running statements have allocated and not yet
    touched (DbStats.pending_bytes): pressure before the kernel has charged it."""
    total = sum(db.pending_bytes for db in stats if db.up)
    return dataclasses.replace(reading, pending_bytes=total) if total else reading


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
        self.watches: list[Watch] = []
        self.table = ProcTable()
        self.classifier = Classifier()
        self._seqs: dict[str, int] = {}     # scope -> the number of its last snapshot
        # database -> its server pid: when it was placed in a watch, and at the last collect.
        # They differ when a server started after dbguard or again in another pod (scope).
        self._placed: dict[str, int | None] = {}
        self._seen: dict[str, int | None] = {}
        self.dropped: list[Watch] = []      # watches dropped since the daemon last undid their scores
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
        """Watch each scope that can run out (sense/scope.py): [pressure] cgroup when set, else
        the scope of each identified database server, one watch per distinct cgroup."""
        p = self.cfg.pressure
        if p.cgroup:
            scope, missed = configured(p.cgroup), unwatched(configured(p.cgroup), self._scopes(stats))
            if missed:
                log.warning("%s", missed)
                scope = dataclasses.replace(scope, why=f"{scope.why}; {missed}")
            groups = [(scope, tuple(s.name for s in stats))]
        else:
            own = self._scopes(stats)
            groups = group({s.name: own.get(s.name) for s in stats})
        try:
            for scope, names in groups:
                self.watches.append(self._watch(scope, names))
        except DbguardError:
            self._close_watches()
            raise
        self._placed = {s.name: s.server_pid for s in stats}
        self._host_psi()

    def _host_psi(self) -> None:
        """The host's PSI counts for a scope without its own (cgroup v1) only when it is the
        only scope (sense/pressure.py)."""
        for w in self.watches:
            w.monitor.count_host_psi = len(self.watches) == 1

    @staticmethod
    def _scopes(stats: list) -> dict[str, Scope]:
        """The scope each identified server's own limit makes (a server gone meanwhile: none)."""
        out = {}
        for s in stats:
            if s.server_pid:
                with contextlib.suppress(DbguardError, OSError):
                    out[s.name] = scope_of(s.server_pid)
        return out

    def place(self, name: str, server_pid: int | None) -> Watch:
        """Where a database found after start is answered (a new pod): the watch of its own
        scope, opened now if it is a new one; the first when [pressure] cgroup is set or its
        scope cannot be read."""
        scope = None
        if server_pid and not self.cfg.pressure.cgroup:
            with contextlib.suppress(DbguardError, OSError):
                scope = scope_of(server_pid)
        w = next((w for w in self.watches if scope is not None and w.scope.cgroup_dir == scope.cgroup_dir), None)
        if w is None and scope is not None:
            with contextlib.suppress(DbguardError):
                w = self._watch(scope, ())
                self.watches.append(w)
                self._host_psi()
        w = w or self.watches[0]
        w.databases += (name,)
        self._placed[name] = server_pid
        return w

    def update_scopes(self) -> bool:
        """Scopes whose cgroup went away (a pod deleted) dropped, databases whose server started
        since or moved (a pod started after dbguard, or again elsewhere) and those found since
        (discovery) placed, each in its own scope (a new pod: a new scope); a watch left with no
        database dropped; whether anything changed."""
        scopes = [w.name for w in self.watches]
        for w in self.gone():
            log.info("scope %s: its cgroup is gone; no longer watched", w.name)
        for name in self.moved():
            log.info("database %s: server pid %s, answered in scope %s", name, self._placed[name],
                     next(w.name for w in self.watches if name in w.databases))
        added = self.rediscover()
        for name in added:
            w = self.place(name, self.databases[name].collect().server_pid)
            log.info("now protecting %s (scope %s)", name, w.name)
        self._drop_empty()
        return bool(added) or scopes != [w.name for w in self.watches]

    def moved(self) -> list[str]:
        """Databases whose server is another process than when they were placed (one that was
        down at start: placed in the host's watch), placed again where that server is now. Only
        server pids already collected are compared: no SQL and no cgroup walk when none changed."""
        if self.cfg.pressure.cgroup:          # one configured scope answers every database
            return []
        out = [n for n, pid in self._seen.items() if pid and pid != self._placed.get(n) and n in self.databases]
        for name in out:
            for w in self.watches:
                w.databases = tuple(d for d in w.databases if d != name)
            self.place(name, self._seen[name])
        return out

    def _drop_empty(self) -> None:
        """Watches no database is answered in any more (the host's, opened for a server not
        found at start), closed; the last one stays (the host when nothing is configured)."""
        for w in [w for w in self.watches if not w.databases][:len(self.watches) - 1]:
            self.watches.remove(w)
            w.close()
            self.dropped.append(w)
            log.info("scope %s: no database answered there any more; no longer watched", w.name)
        self._host_psi()

    def gone(self) -> list[Watch]:
        """Watches whose cgroup was removed (a pod deleted), dropped; their databases are placed
        again by where their servers are now (gone too: the first watch). The last watch stays."""
        out = [w for w in self.watches if w.cgroup and not os.path.isdir(w.cgroup)][:len(self.watches) - 1]
        for w in out:
            self.watches.remove(w)
            w.close()
        self.dropped += out
        self._host_psi()
        stats = {s.name: s for s in self.collect()} if out else {}
        for name in (n for w in out for n in w.databases):
            self.place(name, stats[name].server_pid if name in stats else None)
        return out

    def _watch(self, scope: Scope, names: tuple[str, ...]) -> Watch:
        p = self.cfg.pressure
        cgroup = scope.cgroup_dir if relative_memcg(scope.cgroup_dir) is not None else ""
        return Watch(scope, names, PressureMonitor(cgroup or None, trigger_stall_us=p.psi_trigger_stall_us,
                                                   trigger_window_us=p.psi_trigger_window_us))

    def collect(self) -> list:
        stats = []
        for db in list(self.databases.values()):
            t0 = time.monotonic()
            s = db.collect()
            self.observe_collector(f"{db.kind}:{db.name}", s.up, time.monotonic() - t0)
            stats.append(s)
        self._seen = {s.name: s.server_pid for s in stats}
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
        reading = MemoryReading(cgroup="", cgroup_version=0, usage_bytes=0, limit_bytes=None,
                                psi_some_avg10=0.0, psi_full_avg10=0.0)
        return Snapshot(ts=time.time(), memory=reading, procs=procs, roles=classify(procs, [], self.self_pid),
                        databases=(), self_pid=self.self_pid)

    def follow_processes(self) -> str:
        """For a long run: learn births and exits from the kernel instead of listing /proc."""
        self.table.events = open_events()
        return ("process events from the kernel (netlink process connector)" if self.table.events
                else "process connector unavailable here: /proc listed each cycle")

    def snapshots(self, readings: list[MemoryReading], fresh: list[bool]) -> list[Snapshot]:
        """One Snapshot per watch (readings and `fresh` in the same order). `fresh`: every
        process of that scope is read this cycle (under pressure, and for one-shot callers);
        otherwise the table is refreshed at rest's pace (sense/proctable.py). The process
        table, the SQL and the roles are read once; each scope gets the processes it holds
        innermost (sense/scope.owner), its own databases and the caches whose server it holds."""
        t0 = time.monotonic()
        pressed = [w for w, f in zip(self.watches, fresh) if f]
        members = None
        if pressed and all(w.cgroup for w in pressed):
            found = [scope_members(w.cgroup) for w in pressed]
            members = None if any(m is None for m in found) else {pid: at for m in found for pid, at in m.items()}
        memcg = pressed[0].memcg if members is not None and len(pressed) == 1 else None
        procs = self.table.refresh(bool(pressed), members, memcg)
        self.observe_collector("procfs", True, time.monotonic() - t0)
        stats = self.collect()
        caches = self.collect_caches()
        read = self.table.take_changed()
        roles = self.classifier.update(procs, stats, self.self_pid, caches, read)
        # Every scope gets a snapshot of every refresh, so the pids changed since the last
        # refresh are those changed since that scope's last snapshot (a superset for it).
        changed, ts = frozenset(read | self.classifier.changed), time.time()
        if len(self.watches) == 1:
            return [Snapshot(ts=ts, memory=pending(readings[0], stats), procs=procs, roles=roles,
                             databases=tuple(stats), self_pid=self.self_pid, caches=tuple(caches), changed=changed,
                             **self._numbered(self.watches[0]))]
        split, out = held(procs, [w.memcg for w in self.watches]), []
        for i, (w, reading, mine) in enumerate(zip(self.watches, readings, split)):
            dbs = tuple(s for s in stats if s.name in w.databases)
            out.append(Snapshot(ts=ts, memory=pending(reading, dbs), procs=mine,
                                roles={p: r for p, r in roles.items() if p in mine}, databases=dbs,
                                self_pid=self.self_pid, changed=changed, **self._numbered(w),
                                caches=tuple(c for c in caches if c.server_pid in mine or c.server_pid not in procs
                                             and i == 0)))
        return out

    def _numbered(self, w: Watch) -> dict[str, int]:
        """seq and since of a scope's next snapshot (model.Snapshot)."""
        seq, since = next(SNAPSHOTS), self._seqs.get(w.name, -1)
        self._seqs[w.name] = seq
        return {"seq": seq, "since": since}

    def snapshot(self, reading: MemoryReading | None = None, fresh: bool = True) -> Snapshot:
        """The first scope's Snapshot (one-shot callers of a single scope: benchmarks)."""
        return self.snapshots([reading or self.watches[0].monitor.read()] + [
            w.monitor.read() for w in self.watches[1:]], [fresh] * len(self.watches))[0]

    def _close_watches(self) -> None:
        for w in self.watches:
            w.close()
        self.watches = []

    def close(self) -> None:
        for db in [*self.databases.values(), *self.caches.values()]:
            try:
                db.close()
            except Exception as e:   # closing must not hide the reason we stop
                log.warning("closing %s: %s", db.name, e)
        self._close_watches()
        if self.table.events is not None:
            self.table.events.close()
            self.table.events = None
