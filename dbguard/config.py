"""Configuration: TOML in, validated frozen dataclasses out.

One schema (the dataclasses below) serves loading, validation and the defaults; every
error is one line that names the key path, e.g. `pressure.warn_usage: must be between 0 and 1`.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import rules, validate
from .caches import registry as caches_registry
from .databases import registry
from .errors import ConfigError
from .escape import has_control, printable, shown
from .caches.config import CacheConfig, PoolerConfig
from .schema import Bounded, Size, read_password
from .units import finite, parse_size, toml_key

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


def _type_name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, "a list of strings")


def _text(value: str, path: str, key: str) -> str:
    # Whitespace separates a DSN's options (a long one may be written over several lines).
    allowed = "\t\n\r" if key == "dsn" else ""
    if has_control(value, allowed):
        raise ConfigError(f"{path}: holds a control character ({shown(value)}); remove it")
    return value


def _coerce(value: Any, tp: Any, f: dataclasses.Field, path: str) -> Any:
    if f.metadata.get("size"):
        return parse_size(value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: expected a list of strings, got {shown(value)}")
        return tuple(_text(v, path, f.name) for v in value)
    if origin in (typing.Union, types.UnionType):   # bool | str: the "auto" switches
        if isinstance(value, bool) or value == "auto":
            return value
        raise ConfigError(f'{path}: expected true, false or "auto", got {shown(value)}')
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{path}: {shown(value)} is out of range") from None
    if tp is bool and not isinstance(value, bool) or tp is not bool and (
            isinstance(value, bool) or not isinstance(value, tp)):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {shown(value)}")
    if tp is float:
        finite(value, path)
    if tp is str:
        _text(value, path, f.name)
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{path}: must be {bounds}, got {shown(value)}")
    return value


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """An instance of `cls` from a TOML table. A bad value is a problem and its default is
    kept, so the checks after this one still run and every problem is reported at once."""
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a table, got {shown(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        kpath = f"{path}.{toml_key(key)}" if path else toml_key(key)
        if key not in fields:
            close = [k for k in fields if key and k.startswith(key[:3])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{kpath}: unknown key{hint}")
            continue
        tp = hints[key]
        try:
            if dataclasses.is_dataclass(tp):
                kwargs[key] = _build(tp, value, kpath, problems)
            elif key == "databases":
                if not isinstance(value, list):
                    raise ConfigError(f"{kpath}: expected [[databases]] tables")
                built = (_database(v, i, problems) for i, v in enumerate(value))
                kwargs[key] = tuple(db for db in built if db is not None)
            elif key in ("caches", "poolers"):
                if not isinstance(value, list):
                    raise ConfigError(f"{kpath}: expected [[{key}]] tables")
                built = (_app_cache(key, v, i, problems) for i, v in enumerate(value))
                kwargs[key] = tuple(c for c in built if c is not None)
            elif cls is PolicyConfig and key == "rules":
                if not isinstance(value, list):
                    raise ConfigError(f"{kpath}: expected [[policy.rules]] tables")
                kwargs[key] = tuple(_rule(v, f"{kpath}[{i}]", problems) for i, v in enumerate(value))
            elif cls is PolicyConfig and key == "cgroup_tiers":
                kwargs[key] = _cgroup_tiers(value, kpath)
            else:
                kwargs[key] = _coerce(value, tp, fields[key], kpath)
        except ConfigError as e:
            problems.extend(e.problems)
    return cls(**kwargs)


def _database(data: Any, index: int, problems: list[str]) -> DatabaseConfig | None:
    """None when the table cannot describe a database at all (not a table, unknown kind)."""
    path = f"databases[{index}]"
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a table, got {shown(data)}")
        return None
    db = _build(DatabaseConfig, data, path, problems)
    try:
        kind = registry.kind(db.kind, f"{path}.kind")
    except ConfigError as e:
        problems.extend(e.problems)
        return None
    wrong = registry.foreign_keys(db.kind) & set(data)
    problems.extend(f"{path}.{key}: not a {db.kind} setting" for key in sorted(wrong))
    if db.password_env and db.password_file:
        problems.append(f"{path}: set password_file or password_env, not both")
    try:
        kind.check(db, path)
    except ConfigError as e:
        problems.extend(e.problems)
    return dataclasses.replace(db, name=db.name or f"{db.kind}{index}")


def _app_cache(table: str, data: Any, index: int, problems: list[str]) -> CacheConfig | PoolerConfig | None:
    """A [[caches]] or [[poolers]] entry; None when it cannot describe one (not a table, unknown kind)."""
    path = f"{table}[{index}]"
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a table, got {shown(data)}")
        return None
    c = _build(CacheConfig if table == "caches" else PoolerConfig, data, path, problems)
    try:
        kind = caches_registry.kind(table, c.kind, f"{path}.kind")
    except ConfigError as e:
        problems.extend(e.problems)
        return None
    problems.extend(f"{path}.{key}: not a {c.kind} setting" for key in sorted(kind.refused_keys & set(data)))
    if c.password_env and c.password_file:
        problems.append(f"{path}: set password_file or password_env, not both")
    problems.extend(caches_registry.problems(kind, c, path))
    return dataclasses.replace(c, name=c.name or f"{c.kind}{index}")


_RULE_LISTS = ("role", "cgroup", "exe", "user", "in_tier")
_RULE_SIZES = ("rss_above", "pss_above")


def _cgroup_tiers(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """[policy.cgroup_tiers] "glob" = "tier": kept in file order (tomllib keeps a table's order)."""
    if not isinstance(value, dict):
        raise ConfigError(f'{path}: expected a table of "cgroup glob" = "tier", e.g. '
                          f'"/tenants/free/*" = "free", got {shown(value)}')
    problems = []
    for glob, tier in value.items():
        kpath = f"{path}.{toml_key(glob)}"
        if not isinstance(tier, str):
            problems.append(f"{kpath}: expected a tier name, got {shown(tier)}")
        elif has_control(glob) or has_control(tier):
            problems.append(f"{kpath}: holds a control character; remove it")
    if problems:
        raise ConfigError(*problems)
    return tuple(value.items())


def _rule(data: Any, path: str, problems: list[str]) -> RuleConfig:
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a table, got {shown(data)}")
        return RuleConfig()
    data = dict(data)
    for key in _RULE_LISTS:           # one item or a list: `exe = "/usr/bin/*"` reads naturally
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    for key in _RULE_SIZES:
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(f'{path}.{key}: expected a size such as "2GiB" or a multiple such as '
                            f'"2x kill.min_rss", got {shown(value)}')
            del data[key]
        else:
            try:
                if isinstance(value, int):
                    parse_size(value, f"{path}.{key}")     # bounds first: str() of 5000 digits fails
                data[key] = str(value)
            except ConfigError as e:
                problems.extend(e.problems)
                del data[key]
    rule = _build(RuleConfig, data, path, problems)
    if "weight" in data and rule.action != "prefer":
        problems.append(f"{path}.weight: only a prefer rule has a weight (action is {shown(rule.action)})")
    return rule


def from_dict(data: dict[str, Any], source: str = "", *, host: bool = False) -> Config:
    """The Config, or ConfigError with every problem found (each one line naming its key).

    host=True adds what only this host can tell (users, password files, directories):
    what `run` would otherwise stumble on later; see dbguard.validate."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    problems += validate.static_problems(cfg)
    warnings: list[str] = []
    try:
        warnings = rules.validate(cfg.policy)
    except ConfigError as e:
        problems.extend(e.problems)
    if host:
        problems += validate.host_problems(cfg)
    if problems:
        raise ConfigError(*dict.fromkeys(problems))      # each once, in the order found
    return dataclasses.replace(cfg, source=source, warnings=tuple(warnings))


def load(path: str | os.PathLike, *, host: bool = True) -> Config:
    """Read and validate a config file; every problem at once, each one line (ConfigError)."""
    where = printable(os.fspath(path))
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid TOML: {printable(e)}") from None
    except ValueError:
        # tomllib's int() of an integer over 4300 digits; no dbguard setting is anywhere near
        raise ConfigError(f"{where}: not valid TOML for dbguard: an integer thousands of digits long") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion; no dbguard key nests.
        raise ConfigError(f"{where}: not valid TOML for dbguard: a value is nested deeper than the TOML "
                          "reader goes; no dbguard setting nests more than a list of tables") from None
    return from_dict(data, os.fspath(path), host=host)


def default() -> Config:
    return Config()
