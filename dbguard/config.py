"""Configuration: TOML in, validated frozen dataclasses out.

One schema (the dataclasses of settings.py) serves loading, validation and the defaults; every
error is one line that names the key path, e.g. `pressure.warn_usage: must be between 0 and 1`.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from . import rules, validate
from .caches import registry as caches_registry
from .databases import registry
from .errors import ConfigError
from .escape import has_control, printable, shown
from .caches.config import CacheConfig, PoolerConfig
from .settings import Config, DatabaseConfig, PolicyConfig, RuleConfig
from .units import finite, parse_size, toml_key


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
