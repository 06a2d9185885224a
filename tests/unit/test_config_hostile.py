"""Hostile values for every key, through `dbguard check-config` as a user runs it.

Whatever the file holds, the command ends with exit 0, or exit 2 and one line per problem,
each naming its key (or the file); never a traceback, never exit 1, never a secret.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbguard import config
from dbguard.settings import Audit, Bpf, General, Kill, Metrics, Pressure, Protection

ROOT = Path(__file__).resolve().parents[2]
SECRET = "S3cretCanary"
SECTIONS = {"general": General, "pressure": Pressure, "kill": Kill,
            "protection": Protection, "bpf": Bpf, "audit": Audit, "metrics": Metrics}


# --- a TOML writer for any value (tomllib reads, nothing in the stdlib writes) -------------------

def toml_string(s: str) -> str:
    # JSON escapes are TOML escapes, except that TOML wants DEL escaped too.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v) if v < 10**4000 else "9" * 5000      # str() itself stops at 4300 digits
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, Deep):
        return "[" * v.depth + "]" * v.depth
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


@dataclasses.dataclass(frozen=True)
class Deep:
    depth: int


def toml_document(doc: dict) -> str:
    lines = []
    for section, table in doc.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{section}]]")
                lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# --- hostile values ----------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "..", "/..", "/sys/fs/cgroup/../etc", "\x1b[2J", "a\nb", "\u202eevil", "\x00",
                     "auto", "127.0.0.1:99999", "127.0.0.1:0", "[::1]:9633", "/dev/full", "/etc/passwd",
                     "relative/path", "9" * 400, "2x kill.min_rss", "1e400x limit", "512MiB", "-1", "nan"]))
dsns = st.sampled_from([
    f"postgresql://u:{SECRET}@h/db", f"dbname='x'password={SECRET}", f"postgresql://u@h/db?password={SECRET}",
    f"postgresql://u:{SECRET}%zz@h/db", f"postgresql://u:{SECRET}@[::1/db", f"host=h {SECRET}",
    f"dbname='{SECRET}", "host=/run/pg port=99999", "host=/run/pg port=5432", "host=h\x00", "service=x"])
scalars = st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 2**63, -2**63, 10**5000]),
                    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]), hostile_text)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(hostile_text, scalars, max_size=2),
                   st.builds(Deep, st.sampled_from([2, 50, 400, 3000, 50_000])))


def keys_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


@st.composite
def documents(draw) -> dict:
    doc: dict = {}
    for section, cls in SECTIONS.items():
        keys = draw(st.lists(st.sampled_from(keys_of(cls) + ["not_a_key"]), max_size=4, unique=True))
        if keys:
            doc[section] = {k: draw(values) for k in keys}
    dbs = []
    for _ in range(draw(st.integers(0, 2))):
        db = {"kind": draw(st.sampled_from(["postgresql", "mysql", "oracle"]))}
        for k in draw(st.lists(st.sampled_from(keys_of(config.DatabaseConfig)), max_size=4, unique=True)):
            db[k] = draw(dsns) if k == "dsn" else draw(values)
        dbs.append(db)
    if dbs:
        doc["databases"] = dbs
    rules = [{k: draw(values) for k in draw(st.lists(st.sampled_from(keys_of(config.RuleConfig)), max_size=3,
                                                     unique=True))} for _ in range(draw(st.integers(0, 2)))]
    if rules:
        doc["policy.rules"] = rules
    return doc


LINE = re.compile(r'^dbguard: (?P<key>[A-Za-z_"\\\[\].0-9/ -][^:]*): \S')


# HOSTILE_EXAMPLES=600 for a longer hunt (600 passed in 111 s here).
@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents())
def test_check_config_never_crashes_and_names_every_key(doc):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "hostile.toml"
        f.write_text(toml_document(doc), encoding="utf-8")
        r = subprocess.run([sys.executable, "-m", "dbguard.cli", "check-config", str(f)], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode in (0, 2), f"exit {r.returncode}: {out[-2000:]}"
    assert "Traceback" not in out and "internal error" not in out, out[-2000:]
    assert SECRET not in out, out
    assert "\x1b" not in out and "\x00" not in out
    if r.returncode == 0:
        assert r.stdout.startswith(f"{f}: ok"), out
        return
    lines = [ln for ln in r.stderr.splitlines() if ": warning: " not in ln]
    assert lines, out
    for line in lines:
        m = LINE.match(line)
        assert m, f"not one line naming a key: {line!r}"
        key = m.group("key")
        named = {"general", "pressure", "kill", "protection", "bpf", "audit", "metrics", "databases", "policy",
                 str(f)}
        assert any(key == n or key.startswith(n + ".") or key.startswith(n + "[") for n in named), line


@settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", 60)) * 5, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents())
def test_the_validator_in_process_raises_only_config_errors(doc):
    """The same documents, many more of them, through config.load itself: a ConfigError or a Config."""
    from dbguard.errors import ConfigError
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "hostile.toml"
        f.write_text(toml_document(doc), encoding="utf-8")
        try:
            config.load(f)
        except ConfigError as e:
            assert e.problems and all("\n" not in p and SECRET not in p for p in e.problems), e.problems
