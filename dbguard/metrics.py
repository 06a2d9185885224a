"""Prometheus metrics and /healthz for the sidecar.

Names and meanings are documented in docs/metrics.md; the alert rules and the Grafana
dashboard in integrations/prometheus/ use only names defined here (a test checks that).

Figures that describe "now" (level, memory, database caches, shielded processes,
protection status) are kept as one state object replaced under a lock and rendered from
it, so a scrape never sees half of one cycle and half of the next, and a
database or cgroup that went away simply stops being exported.
"""
from __future__ import annotations

import json
import sys
import threading
from collections import Counter as _Tally
from dataclasses import dataclass, field
from typing import Callable

from . import __version__, validate
from .escape import shown
from .errors import DbguardError
from .exposition import CONTENT_TYPE, Family, render
from .model import Action, Level, Outcome, Role, Snapshot
from .serve import HttpServer

PREFIX = "dbguard"
MECHANISMS = ("bpf", "lower_scores", "raise_scores", "kill")
# Roles dbguard keeps out of every kill path; exported with a zero when none is present so
# dashboards show "0 shielded", not "no data".
SHIELDED_ROLES = tuple(r for r in Role if r.never_signalled and r is not Role.KERNEL_THREAD)

HealthCheck = Callable[[], "tuple[bool, str]"]


def parse_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9633) from "127.0.0.1:9633"; IPv6 as "[::1]:9633"."""
    parsed = validate.parse_listen(listen)
    if parsed is None:
        raise DbguardError(f"metrics.listen: expected HOST:PORT such as 127.0.0.1:9633, got {shown(listen)}")
    return parsed


@dataclass
class _State:
    """What the last cycle saw; replaced whole by observe_scopes()/set_protection()."""

    level: int | None = None
    ts: float | None = None
    # (metric name without prefix, labels, value)
    memory: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    databases: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    shielded: dict[str, int] = field(default_factory=dict)
    protection: dict[str, bool] = field(default_factory=dict)


def _state_families(st: _State, bpf: dict[str, int]) -> list[Family]:
    """The families that describe "now", from one state object (never half of two cycles)."""
    out = []
    if st.level is not None:
        out.append(_gauge("pressure_level", "Pressure level, the highest of the watched scopes: 0 ok, 1 warn, "
                          "2 high, 3 critical.", st.level))
        out.append(_gauge("last_snapshot_timestamp_seconds", "Unix time of the last complete sense cycle.", st.ts))
    out += _families(st.memory, _MEMORY_HELP)
    out += _families(st.databases, {**_DB_HELP, **_CACHE_HELP})
    fam = Family(f"{PREFIX}_shielded_processes",
                 "Processes dbguard never signals and shields from the OOM killer, by role.", labels=["role"])
    for role, n in sorted(st.shielded.items()):
        fam.set(n, role)
    out.append(fam)
    fam = Family(f"{PREFIX}_protection_active", "1 when a protection mechanism works here, by mechanism.",
                 labels=["mechanism"])
    for mech, on in st.protection.items():
        fam.set(1.0 if on else 0.0, mech)
    out.append(fam)
    if bpf:
        fam = Family(f"{PREFIX}_bpf_program_events",
                     "What dbguard's BPF programs counted in the kernel, by counter "
                     "(map_full, kills, reclaim_failed, births, ...; docs/metrics.md).", "counter", labels=["counter"])
        for name, n in sorted(bpf.items()):
            fam.set(n, name)
        out.append(fam)
    return out


_MEMORY_HELP = {
    "scope_pressure_level": "Pressure level of this watched scope: 0 ok, 1 warn, 2 high, 3 critical.",
    "memory_usage_bytes": "Memory charged to the watched cgroup (the host: MemTotal - MemAvailable).",
    "memory_limit_bytes": "Memory limit of the watched cgroup (absent when unlimited).",
    "memory_reclaimable_bytes": "Page cache in the watched cgroup the kernel can drop (inactive file).",
    "memory_unreclaimable_ratio": "Usage that reclaim cannot give back, with what database statements have "
                                  "allocated and not yet touched, as a fraction of the limit.",
    "psi_some_avg10_ratio": "PSI memory 'some': fraction of the last 10 s some task stalled on memory.",
    "psi_full_avg10_ratio": "PSI memory 'full': fraction of the last 10 s all tasks stalled on memory.",
}
_DB_HELP = {
    "database_up": "1 when the database answered SQL this cycle.",
    "database_scope": "Always 1: the watched scope (cgroup) the database is answered in.",
    "database_cache_bytes": "Cache size now: shared_buffers / innodb_buffer_pool_size.",
    "database_cache_configured_bytes": "Cache size the DBA configured.",
    "database_cache_used_bytes": "Bytes of the cache holding data.",
    "database_cache_hit_ratio": "Cache hit ratio, 0 to 1 (absent when the database does not report it).",
    "database_shrink_step": "0: caches as the DBA configured them; higher: shrunk by dbguard.",
    "database_shrink_steps_max": "Steps this database can be shrunk by (0: nothing to shrink).",
    "database_sessions": "Sessions seen in the database.",
    "database_identified": "1 when the database's server process is identified by fact (socket, pid file), "
                           "SQL or not.",
    "protection_degraded": "How many configured databases protection is degraded for, by reason "
                           "(database_not_identified: every database server executable is shielded instead).",
}


_CACHE_HELP = {
    "cache_up": "1 when the application cache ([[caches]]) answered this cycle.",
    "cache_used_bytes": "Memory the cache holds: Redis used_memory, memcached total_malloced (its slab pages).",
    "cache_limit_bytes": "Its memory limit now: Redis maxmemory, memcached limit_maxbytes.",
    "cache_configured_limit_bytes": "The limit its owner configured (what dbguard puts back).",
    "cache_shrink_step": "0: the cache's limit as configured; higher: lowered by dbguard.",
    "cache_shrink_steps_max": "Steps this cache can be lowered by (0: it cannot give memory back).",
    "cache_evictions": "Keys the cache server has evicted since it started (its own count).",
    "cache_hit_ratio": "The cache's hit ratio since it started, 0 to 1 (absent before any read).",
    "pooler_up": "1 when the pooler's admin console ([[poolers]]) answered this cycle.",
    "pooler_pool_size": "Server connections per pool now (PgBouncer default_pool_size).",
    "pooler_configured_pool_size": "The pool size its owner configured (what dbguard puts back).",
    "pooler_server_connections": "Server connections the pooler holds to the database now.",
    "pooler_clients_waiting": "Clients waiting in the pooler's queue for a server connection.",
    "pooler_shrink_step": "0: pool sizes as configured; higher: lowered by dbguard.",
}


def _cache_rows(snap: Snapshot) -> list[tuple[str, dict[str, str], float]]:
    rows: list[tuple[str, dict[str, str], float]] = []
    for c in snap.caches:
        if c.pooler:
            labels = {"pooler": c.name, "kind": c.kind}
            rows.append(("pooler_up", labels, 1 if c.up else 0))
            if c.up:
                rows += [("pooler_pool_size", labels, c.limit), ("pooler_configured_pool_size", labels, c.configured),
                         ("pooler_server_connections", labels, c.memory),
                         ("pooler_clients_waiting", labels, c.extra.get("clients_waiting", 0)),
                         ("pooler_shrink_step", labels, c.shrink_step)]
            continue
        labels = {"cache": c.name, "kind": c.kind}
        rows.append(("cache_up", labels, 1 if c.up else 0))
        if c.up:        # a cache that does not answer: its figures are unknown, not zero
            rows += [("cache_used_bytes", labels, c.memory), ("cache_limit_bytes", labels, c.limit),
                     ("cache_configured_limit_bytes", labels, c.configured),
                     ("cache_shrink_step", labels, c.shrink_step),
                     ("cache_shrink_steps_max", labels, 0 if c.why_not else c.shrink_steps_max),
                     ("cache_evictions", labels, c.evictions)]
            if c.hit_ratio is not None:
                rows.append(("cache_hit_ratio", labels, c.hit_ratio))
    return rows


def _gauge(name: str, doc: str, value: float) -> Family:
    return Family(f"{PREFIX}_{name}", doc).set(value)


def _families(rows, helps: dict[str, str]) -> list[Family]:
    by_name: dict[str, Family] = {}
    for name, labels, value in rows:
        fam = by_name.get(name)
        if fam is None:
            fam = by_name[name] = Family(f"{PREFIX}_{name}", helps[name], labels=list(labels))
        fam.set(value, *labels.values())
    return list(by_name.values())


class Metrics:
    def __init__(self, listen: str, *, healthy: HealthCheck | None = None):
        self._healthy = healthy
        self._lock = threading.Lock()      # the families below change in the loop, render in the server
        self._state = _State()
        self._bpf: dict[str, int] = {}
        self._last_roles: tuple[int, dict[int, Role]] | None = None     # (seq, roles) of the last snapshot
        self._roles_tally: _Tally = _Tally()
        self._server: HttpServer | None = None

        build = Family(f"{PREFIX}_build_info", "Always 1; labels say which dbguard runs.", labels=["version", "python"])
        build.set(1, __version__, sys.version.split()[0])     # platform.python_version(), without its 0.5 MiB module
        self._collector_ok = Family(f"{PREFIX}_collector_success",
                                    "1 when the data source answered in the last cycle.", labels=["source"])
        self._collector_seconds = Family(f"{PREFIX}_collector_duration_seconds",
                                         "Seconds the data source took in the last cycle.", labels=["source"])
        self._actions = Family(f"{PREFIX}_actions", "Actions decided, by kind and outcome (done, dry_run, skipped, gone, refused, failed).",
                               "counter", ["kind", "outcome"])
        self._kernel_events = Family(f"{PREFIX}_kernel_events",
                                     "Events seen from the kernel (BPF), by kind.", "counter", ["kind"])
        self._oom_kills = Family(f"{PREFIX}_kernel_oom_kills", "Kernel OOM killer victims seen.", "counter")
        self._bpf_kills = Family(f"{PREFIX}_bpf_kills", "Processes killed in-kernel by the BPF path.", "counter")
        self._breaches = Family(f"{PREFIX}_protection_breaches",
                                "A shielded process was hurt anyway (OOM-killed, score changed), by event kind.",
                                "counter", ["kind"])
        self._audit_errors = Family(f"{PREFIX}_audit_write_errors",
                                    "Audit records that could not be written (the record is lost; protection "
                                    "goes on), by error (ENOSPC, EFBIG, ...).", "counter", ["error"])
        # The loop's pace as it runs (0.2 s under pressure): rate() of it, or its steps against
        # last_snapshot_timestamp_seconds (benchmarks/pace.py).
        self._cycles = Family(f"{PREFIX}_cycles", "Cycles completed (every watched scope read, judged, answered).",
                              "counter")
        # Zero series up front, so increase() in alerts works from the first breach.
        self._breaches.touch("oom_kill")
        self._cycles.touch()
        self._fixed = (build, self._collector_ok, self._collector_seconds, self._actions, self._kernel_events,
                       self._oom_kills, self._bpf_kills, self._breaches, self._audit_errors, self._cycles)

        if listen:
            self._serve(*parse_listen(listen))

    # --- what the daemon feeds in -----------------------------------------------------------
    def observe_collector(self, source: str, ok: bool, seconds: float) -> None:
        with self._lock:
            self._collector_ok.set(1 if ok else 0, source)
            self._collector_seconds.set(seconds, source)

    def observe_snapshot(self, snap: Snapshot, level: Level) -> None:
        self.observe_scopes([(snap, level)])

    def observe_scopes(self, scopes: list[tuple[Snapshot, Level]]) -> None:
        """The last cycle of every watched scope: each one's memory and level (by `cgroup`),
        its databases (with the scope they are answered in), caches and shielded processes."""
        memory, dbs = [], []
        for snap, level in scopes:
            m = snap.memory
            cg = {"cgroup": m.cgroup or "host"}
            memory += [("scope_pressure_level", cg, int(level)),
                       ("memory_usage_bytes", cg, m.usage_bytes),
                       ("memory_reclaimable_bytes", cg, m.reclaimable_bytes),
                       ("psi_some_avg10_ratio", cg, m.psi_some_avg10 / 100.0),
                       ("psi_full_avg10_ratio", cg, m.psi_full_avg10 / 100.0)]
            if m.limit_bytes:
                memory += [("memory_limit_bytes", cg, m.limit_bytes),
                           ("memory_unreclaimable_ratio", cg, m.unreclaimable_ratio)]
            for db in snap.databases:
                labels = {"database": db.name, "kind": db.kind}
                dbs += [("database_up", labels, 1 if db.up else 0),
                        ("database_scope", {**labels, **cg}, 1),
                        ("database_identified", labels, 0 if db.server_pid is None else 1),
                        ("database_shrink_step", labels, db.shrink_step),
                        ("database_shrink_steps_max", labels, db.shrink_steps_max)]
                if db.up:   # a stale database's figures are unknown, not zero
                    dbs += [("database_cache_bytes", labels, db.cache_bytes),
                            ("database_cache_configured_bytes", labels, db.cache_configured_bytes),
                            ("database_cache_used_bytes", labels, db.cache_used_bytes),
                            ("database_sessions", labels, len(db.sessions))]
                    if db.hit_ratio is not None:
                        dbs.append(("database_cache_hit_ratio", labels, db.hit_ratio))
            dbs += _cache_rows(snap)
        dbs.insert(0, ("protection_degraded", {"reason": "database_not_identified"},
                       sum(1 for snap, _ in scopes for db in snap.databases if db.server_pid is None)))
        # One scope: tallied from its changes (_tally_roles); several: each cycle afresh.
        tally = self._tally_roles(scopes[0][0]) if len(scopes) == 1 else \
            _Tally(role for snap, _ in scopes for role in snap.roles.values())
        shielded = {role.value: tally.get(role, 0) for role in SHIELDED_ROLES}
        with self._lock:
            self._cycles.inc()
            self._state = _State(level=max(int(level) for _, level in scopes), ts=max(s.ts for s, _ in scopes),
                                 memory=memory, databases=dbs, shielded=shielded, protection=self._state.protection)

    def _tally_roles(self, snap: Snapshot) -> _Tally:
        """Processes by role, moved by the pids the snapshot names as changed when it follows
        the last one seen (the previous roles are that snapshot's own dict, never copied)."""
        last, roles = self._last_roles, snap.roles
        if last is not None and snap.changed is not None and snap.since == last[0] > 0:
            tally = self._roles_tally
            for pid in snap.changed:
                old, new = last[1].get(pid), roles.get(pid)
                if old is not new:
                    if old is not None:
                        tally[old] -= 1
                    if new is not None:
                        tally[new] += 1
        else:
            self._roles_tally = _Tally(roles.values())
        self._last_roles = (snap.seq, roles)
        return self._roles_tally

    def observe_audit_error(self, kind: str) -> None:
        """AuditLog's on_error: one audit record lost to a write error of this kind."""
        with self._lock:
            self._audit_errors.inc(kind)

    def observe_action(self, action: Action, outcome: Outcome) -> None:
        with self._lock:
            self._actions.inc(action.kind.value, outcome.status.value)

    def observe_kernel_event(self, kind: str, *, breach: bool = False) -> None:
        """kind: "oom_kill" (kernel OOM victim), "bpf_kill", "score_tamper", ..."""
        with self._lock:
            self._kernel_events.inc(kind)
            if kind == "oom_kill":
                self._oom_kills.inc()
            elif kind == "bpf_kill":
                self._bpf_kills.inc()
            if breach:
                self._breaches.inc(kind)

    def observe_bpf_counters(self, counters: dict[str, int]) -> None:
        """The BPF programs' own counters (BpfGuard.counters()), as they stand now."""
        with self._lock:
            self._bpf = dict(counters)

    def set_protection(self, *, bpf: bool, lower_scores: bool, raise_scores: bool, kill: bool) -> None:
        prot = {"bpf": bpf, "lower_scores": lower_scores, "raise_scores": raise_scores, "kill": kill}
        with self._lock:
            st = self._state
            self._state = _State(st.level, st.ts, st.memory, st.databases, st.shielded, prot)

    # --- output ---------------------------------------------------------------------------
    def render(self) -> bytes:
        with self._lock:
            return render([*self._fixed, *_state_families(self._state, self._bpf)])

    def health(self) -> tuple[bool, dict]:
        """(ok, body) for /healthz. Without a health callback: ok when any protection works."""
        prot = self._state_copy().protection
        if self._healthy is not None:
            try:
                ok, detail = self._healthy()
            except Exception as e:   # a broken check must read as unhealthy, not crash the server
                ok, detail = False, f"health check failed: {e}"
        else:
            ok = any(prot.values())
            detail = "protection active" if ok else "no protection mechanism active yet"
        status = "failing" if not ok else "degraded" if detail.startswith("degraded") else "ok"
        return ok, {"status": status, "protection_active": bool(ok), "detail": detail, "protection": prot,
                    "version": __version__}

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the HTTP server listens on (the real port when listen gave port 0)."""
        return self._server.address if self._server else None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------
    def _state_copy(self) -> _State:
        with self._lock:
            return self._state

    def _page(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.render()
        if path == "/healthz":
            ok, body = self.health()
            return 200 if ok else 503, "application/json", json.dumps(body).encode() + b"\n"
        return 404, "text/plain", b"dbguard: try /metrics or /healthz\n"

    def _serve(self, host: str, port: int) -> None:
        try:
            self._server = HttpServer(host, port, self._page)
        except OSError as e:
            raise DbguardError(f"metrics.listen: cannot listen on {host}:{port}: {e.strerror}; "
                               'choose a free address or set listen = "" to turn metrics off') from None
