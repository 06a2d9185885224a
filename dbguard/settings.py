"""The configuration's shape: one frozen dataclass per TOML table, with its defaults and bounds.
config.py reads TOML into these; everything else reads these."""
from __future__ import annotations

from dataclasses import dataclass, field

from .caches.config import CacheConfig, PoolerConfig
from .schema import Bounded, Size, read_password


@dataclass(frozen=True)
class General:
    interval: float = Bounded(1.0, 0.05, 60)
    dry_run: bool = False
    state_dir: str = "/var/lib/dbguard"
    lock_memory: bool = True
    discover: bool = True


@dataclass(frozen=True)
class DatabaseConfig:
    kind: str = ""
    name: str = ""
    # PostgreSQL
    dsn: str = ""
    data_directory: str = ""
    shrink_settings: tuple[str, ...] = ("work_mem", "maintenance_work_mem", "hash_mem_multiplier")
    shrink_floor: int = Size(1024**2)
    close_idle_after: float = Bounded(0.0, 0)
    # MySQL / MariaDB
    host: str = ""
    port: int = Bounded(3306, 1, 65535)
    socket: str = ""
    user: str = ""
    buffer_pool_floor: int = Size(128 * 1024**2)
    shrink_caches: tuple[str, ...] = ()
    session_memory_cap: int = Size(64 * 1024**2)   # new sessions' memory while shrunk; 0: no cap
    # both
    namespace_of: str = ""       # a container's: host pid, pid file or cgroup (databases/namespaces.py)
    password_file: str = ""
    password_env: str = ""
    connect_timeout: float = Bounded(3.0, 0.1, 60)
    statement_timeout: float = Bounded(2.0, 0.1, 60)
    shrink_steps: int = Bounded(3, 0, 16)
    runaway_min_bytes: int = Size(16 * 1024**2)
    terminate_after: float = Bounded(5.0, 0, 600)

    def password(self) -> str | None:
        """Read the password at connect time; never stored in the config object or logged."""
        return read_password(self.password_env, self.password_file, f"databases.{self.name}")


@dataclass(frozen=True)
class Pressure:
    cgroup: str = ""
    warn_usage: float = Bounded(0.80, 0.05, 1.0)
    high_usage: float = Bounded(0.90, 0.05, 1.0)
    critical_usage: float = Bounded(0.96, 0.05, 1.0)
    warn_psi_some: float = Bounded(10.0, 0, 100)
    high_psi_full: float = Bounded(10.0, 0, 100)
    high_io_some: float = Bounded(20.0, 0, 100)
    hysteresis: float = Bounded(0.05, 0, 0.5)
    min_dwell: float = Bounded(5.0, 0, 3600)
    psi_trigger_stall_us: int = Bounded(50_000, 1, 10_000_000)
    psi_trigger_window_us: int = Bounded(2_000_000, 500_000, 10_000_000)


@dataclass(frozen=True)
class Kill:
    enabled: bool = True
    min_rss: int = Size(32 * 1024**2)
    min_interval: float = Bounded(0.2, 0, 3600)
    max_per_minute: int = Bounded(30, 1, 10_000)
    protect_exe: tuple[str, ...] = ("/usr/sbin/sshd", "/usr/lib/systemd/*")
    protect_users: tuple[str, ...] = ()
    prefer_exe: tuple[str, ...] = ()


@dataclass(frozen=True)
class Protection:
    raise_candidates: bool = True
    candidate_oom_score_adj: int = Bounded(500, 1, 1000)
    lower_databases: bool = True
    backend_oom_score_adj: int = Bounded(-900, -999, 0)


@dataclass(frozen=True)
class Bpf:
    enabled: bool | str = "auto"
    max_procs: int = Bounded(16384, 64, 1_000_000)
    max_cgroups: int = Bounded(1024, 1, 100_000)
    min_level_to_kill: int = Bounded(3, 1, 3)
    fail_streak: int = Bounded(3, 1, 1000)
    early_fail_streak: int = Bounded(8, 0, 1000)
    fail_pages: int = Bounded(0, 0, 1_000_000)
    unlisted: bool = True
    births: bool = True
    cancel: bool = True
    cancel_streak: int = Bounded(1, 1, 1000)
    cancel_interval: float = Bounded(0.05, 0, 60)
    cancel_pages: int = Bounded(0, 0, 1_000_000)
    cancel_level: int = Bounded(3, 0, 3)


@dataclass(frozen=True)
class RuleConfig:
    """One [[policy.rules]] table; matching and its meaning live in dbguard.rules."""

    name: str = ""
    # match: every field given must hold; a list matches when any of its items does
    role: tuple[str, ...] = ()
    cgroup: tuple[str, ...] = ()
    exe: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    rss_above: str = ""          # a size ("2GiB") or a multiple of a named threshold ("2x kill.min_rss")
    pss_above: str = ""          # the same forms, on PSS (/proc/PID/smaps_rollup), read only when reached
    in_tier: tuple[str, ...] = ()  # the tier policy.cgroup_tiers (or default_tier) gives the process
    # outcome
    action: str = "default"
    weight: int = Bounded(1, 1, 1000)
    tier: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    tiers: tuple[str, ...] = ("default",)   # kill order: processes of the first tier die first
    default_tier: str = ""                  # tier of processes no rule gives one; "": the first
    # memory cgroup glob -> tier, in file order (the first glob that matches wins); a process
    # no glob matches is in default_tier. A rule's own `tier` overrides it.
    cgroup_tiers: tuple[tuple[str, str], ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    # From which level application caches ([[caches]]) and poolers ([[poolers]]) are shrunk:
    # "warn" (with the database's caches, before any kill), "high", "critical" or "never".
    caches_from: str = "warn"
    poolers_from: str = "warn"


@dataclass(frozen=True)
class Audit:
    path: str = "/var/log/dbguard/audit.jsonl"


@dataclass(frozen=True)
class Metrics:
    listen: str = "127.0.0.1:9633"


@dataclass(frozen=True)
class Config:
    general: General = field(default_factory=General)
    databases: tuple[DatabaseConfig, ...] = ()
    caches: tuple[CacheConfig, ...] = ()
    poolers: tuple[PoolerConfig, ...] = ()
    pressure: Pressure = field(default_factory=Pressure)
    kill: Kill = field(default_factory=Kill)
    protection: Protection = field(default_factory=Protection)
    bpf: Bpf = field(default_factory=Bpf)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    audit: Audit = field(default_factory=Audit)
    metrics: Metrics = field(default_factory=Metrics)
    source: str = field(default="", metadata={"internal": True})
    # Problems that do not stop dbguard (a rule that can never match): shown by check-config and at start.
    warnings: tuple[str, ...] = field(default=(), metadata={"internal": True})
