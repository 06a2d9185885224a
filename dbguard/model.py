"""The facts dbguard passes between sense, decide and act.

Plain frozen data: sense builds it, policy reads it, act carries out what policy returns.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Level(enum.IntEnum):
    OK = 0
    WARN = 1
    HIGH = 2
    CRITICAL = 3


class Role(str, enum.Enum):
    """What a process is to dbguard, established by fact (pid files, SQL), not by name."""

    POSTMASTER = "postmaster"
    PG_AUXILIARY = "pg_auxiliary"      # checkpointer, walwriter, startup, ...
    PG_BACKEND = "pg_backend"          # client backends and parallel workers
    MYSQLD = "mysqld"
    CACHE_SERVER = "cache_server"      # a [[caches]] server: shielded while it can give memory back
    DB_CHILD = "db_child"              # descended from a database process (any depth): COPY ... TO PROGRAM,
                                       # archive_command, restore_command, pgBackRest/wal-g helpers
    DB_UNKNOWN = "db_unknown"          # runs a database server executable no configured database
                                       # identified (another server, or one dbguard cannot identify)
    DBGUARD = "dbguard"
    INIT = "init"
    KERNEL_THREAD = "kernel_thread"
    OTHER = "other"

    @property
    def is_database(self) -> bool:
        return self in DATABASE_ROLES

    @property
    def db_family(self) -> bool:
        """A database process, a descendant of one, or a database server nobody identified:
        never a kill candidate, its score never raised."""
        return self in DATABASE_ROLES or self in FAMILY_ROLES

    @property
    def never_signalled(self) -> bool:
        """Processes dbguard must never send a signal to, whatever the policy says."""
        return self.db_family or self in (Role.DBGUARD, Role.INIT, Role.KERNEL_THREAD)


DATABASE_ROLES = frozenset({Role.POSTMASTER, Role.PG_AUXILIARY, Role.PG_BACKEND, Role.MYSQLD})
FAMILY_ROLES = frozenset({Role.DB_CHILD, Role.DB_UNKNOWN})


@dataclass(frozen=True, order=True)
class ProcKey:
    """A process identity that survives PID reuse: pid plus start time in clock ticks."""

    pid: int
    start_time: int


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    start_time: int            # /proc/PID/stat field 22, clock ticks since boot
    ppid: int
    uid: int
    comm: str
    exe: str                   # resolved /proc/PID/exe, "" when unreadable
    cmdline: str
    rss_bytes: int
    memcg: str                 # memory cgroup path relative to the hierarchy root, "/..."
    oom_score_adj: int
    kernel_thread: bool = False

    @property
    def key(self) -> ProcKey:
        return ProcKey(self.pid, self.start_time)


@dataclass(frozen=True)
class MemoryReading:
    """Memory state of the watched cgroup (or the host), one sample."""

    cgroup: str                # directory under /sys/fs/cgroup, or "" for the host
    cgroup_version: int        # 1, 2, or 0 for the host (MemAvailable)
    usage_bytes: int
    limit_bytes: int | None    # None: unlimited
    psi_some_avg10: float      # percent
    psi_full_avg10: float      # percent
    reclaimable_bytes: int = 0 # page cache the kernel can drop now (inactive_file not dirty nor under writeback)
    io_some_avg10: float = 0.0 # IO pressure, percent (the scope's own on v2, else host-wide)
    pending_bytes: int = 0     # memory the databases' running sessions have allocated and not yet
                               # touched (DbStats.pending_bytes): charged to the scope as they go on

    @property
    def usage_ratio(self) -> float:
        if not self.limit_bytes:
            return 0.0
        return self.usage_bytes / self.limit_bytes

    @property
    def unreclaimable_ratio(self) -> float:
        """Usage that reclaim cannot give back, with what the sessions have allocated and are
        about to touch, over the limit: what the levels are judged on (a cgroup full of page
        cache is not in trouble; one whose sessions have asked for more than it holds soon is)."""
        if not self.limit_bytes:
            return 0.0
        return self.unreclaimable_bytes / self.limit_bytes

    @property
    def unreclaimable_bytes(self) -> int:
        return max(0, self.usage_bytes - self.reclaimable_bytes) + self.pending_bytes


@dataclass(frozen=True)
class DbSession:
    pid: int                   # server-side pid (PostgreSQL backend) or thread/connection id (MySQL)
    kind: str                  # backend_type for PostgreSQL, "connection" for MySQL
    state: str                 # active, idle, idle in transaction, ...
    user: str = ""
    query: str = ""
    age_seconds: float = 0.0   # time since the current query (or state) started
    memory_bytes: int = 0      # best estimate of the private memory the session holds (never shared buffers)
    temp_bytes: int = 0        # its open temporary files (PostgreSQL pgsql_tmp): page cache it charges
    started: float | None = None  # when its statement (or state) began, epoch seconds by the server's clock:
                               # with pid, names one statement (None: the server does not say)
    client: bool = True        # a client's session; False: replication, autovacuum, background workers,
                               # binlog dump, the server's own threads: never ended by dbguard

    @property
    def held_bytes(self) -> int:
        """What ending its statement gives back: private memory and temporary files."""
        return self.memory_bytes + self.temp_bytes


@dataclass(frozen=True)
class DbStats:
    """What one database reported this cycle. `up=False` means stale: protection goes on without SQL."""

    name: str
    kind: str                             # "postgresql" or "mysql"
    up: bool
    error: str = ""                       # one line, when not up
    server_pid: int | None = None         # postmaster / mysqld, found by fact (SQL is not needed)
    identity: str = ""                    # which fact named server_pid, or why no server was found
    data_directory: str = ""
    roles: dict[int, Role] = field(default_factory=dict)   # pid -> role, from SQL facts
    sessions: tuple[DbSession, ...] = ()
    cache_bytes: int = 0                  # shared_buffers / innodb_buffer_pool_size now
    cache_configured_bytes: int = 0       # what the DBA configured
    cache_used_bytes: int = 0
    hit_ratio: float | None = None
    shrink_step: int = 0                  # 0: as the DBA configured; higher: shrunk further
    shrink_steps_max: int = 0             # 0: nothing this database can shrink
    grow_bytes: int = 0                   # memory the next grow step would add; 0: not known
    resize_in_progress: bool = False      # a cache resize is still running (server or our worker)
    self_shrunk_ago: float | None = None  # seconds since the server shrank its own cache (MariaDB's
                                          # innodb_buffer_pool_size_auto_min), None: not lately
    pending_bytes: int = 0                # what its running sessions have allocated and not yet touched,
                                          # at least (mysql/stats.py): memory about to be charged
    extra: dict[str, Any] = field(default_factory=dict)    # kind-specific figures for explain/metrics


@dataclass(frozen=True)
class CacheStats:
    """One application cache or pooler this cycle ([[caches]], [[poolers]]). Sizes are bytes for
    a cache, server connections per pool for a pooler (`unit`)."""

    name: str
    kind: str                             # "redis", "memcached", "pgbouncer"
    up: bool
    error: str = ""                       # one line, when not up
    pooler: bool = False
    unit: str = "bytes"                   # what memory/limit/configured count: "bytes" or "connections"
    server_pid: int | None = None         # the process listening at its endpoint, by fact
    memory: int = 0                       # used_memory / bytes / server connections in use
    limit: int = 0                        # maxmemory / limit_maxbytes / default_pool_size now
    configured: int = 0                   # what its owner configured (the originals while changed)
    shrink_step: int = 0
    shrink_steps_max: int = 0             # 0: nothing to shrink (at its floor, or it cannot: `why_not`)
    grow_bytes: int = 0                   # memory the next grow step may take back
    why_not: str = ""                     # why it cannot give memory back (noeviction, CONFIG refused)
    held: str = ""                        # why its next shrink step waits now (the last one still taking effect)
    evictions: int = 0
    hit_ratio: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exhausted(self) -> bool:
        """Nothing more to give back: down, unable, or at its floor."""
        return not self.up or bool(self.why_not) or self.shrink_step >= self.shrink_steps_max


@dataclass(frozen=True)
class Snapshot:
    ts: float
    memory: MemoryReading
    procs: dict[int, Proc]
    roles: dict[int, Role]                # pid -> role, for every pid in procs whose role is not OTHER
    databases: tuple[DbStats, ...]
    self_pid: int
    caches: tuple[CacheStats, ...] = ()   # application caches and poolers
    # Snapshots are numbered (one count for the process); `changed` names every pid whose Proc
    # or role differs from those of snapshot `since` (None: not known), so what rests on them
    # is worked out again for those only.
    seq: int = 0
    since: int = -1
    changed: frozenset[int] | None = None


class ActionKind(str, enum.Enum):
    SET_OOM_SCORE_ADJ = "set_oom_score_adj"
    KILL = "kill"
    CANCEL_QUERY = "cancel_query"
    TERMINATE_SESSION = "terminate_session"
    SHRINK_CACHE = "shrink_cache"      # one step smaller
    GROW_CACHE = "grow_cache"          # one step back toward the DBA's size
    RESTORE_CACHE = "restore_cache"    # back to the DBA's size at stop


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    pid: int | None = None
    start_time: int | None = None          # with pid: the identity the action is meant for
    target: str = ""                       # human description: "hog (rss 150 MiB)", "postgresql main"
    database: str | None = None            # database name for SQL actions
    cache: str | None = None               # [[caches]]/[[poolers]] name for their resizes
    value: int | None = None               # oom_score_adj value, shrink step, ...
    dry_run: bool = False
    scope: str = ""                        # the watched scope whose pressure decided it ("" with one scope)


@dataclass(frozen=True)
class Plan:
    level: Level
    level_reason: str
    actions: tuple[Action, ...]
    deferred: tuple[tuple[str, str], ...] = ()   # (target, why): answers the policy puts off now


class Status(str, enum.Enum):
    """How an act ended. The policy learns from it; the audit record says it."""

    DONE = "done"            # carried out
    DRY_RUN = "dry_run"      # decided and logged, deliberately not carried out
    SKIPPED = "skipped"      # no longer needed when its turn came (pressure fell, nothing to do)
    GONE = "gone"            # the target no longer exists (process exited, pid reused, session ended)
    REFUSED = "refused"      # the safety rules forbid it
    FAILED = "failed"        # tried, and it did not work


@dataclass(frozen=True)
class Outcome:
    """The result of one act: a Status and one line of detail (never a secret)."""

    status: Status
    detail: str = ""

    @classmethod
    def done(cls, detail: str = "") -> "Outcome":
        return cls(Status.DONE, detail)

    @classmethod
    def failed(cls, detail: str) -> "Outcome":
        return cls(Status.FAILED, detail)

    @classmethod
    def gone(cls, detail: str) -> "Outcome":
        return cls(Status.GONE, detail)

    @classmethod
    def refused(cls, detail: str) -> "Outcome":
        return cls(Status.REFUSED, detail)

    @classmethod
    def skipped(cls, detail: str) -> "Outcome":
        return cls(Status.SKIPPED, detail)

    @classmethod
    def dry_run(cls, detail: str = "not carried out") -> "Outcome":
        return cls(Status.DRY_RUN, detail)

    @property
    def carried_out(self) -> bool:
        return self.status is Status.DONE

    @property
    def ok(self) -> bool:
        """Nothing went wrong: carried out, or deliberately or rightly not."""
        return self.status in (Status.DONE, Status.DRY_RUN, Status.SKIPPED)

    @property
    def result(self) -> str:
        """The audit record's `result`: the detail, prefixed by the status unless it was done or
        the target was gone (those details say it themselves)."""
        if self.status in (Status.DONE, Status.GONE):
            return self.detail
        return f"{self.status.value}: {self.detail}" if self.detail else self.status.value
