"""How actions name what they act on, in the audit log and in explain."""
from __future__ import annotations

from ..databases import registry
from ..model import DbSession, DbStats, Proc

MiB = 1024 * 1024


def pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def proc_name(p: Proc) -> str:
    return f"{p.comm} (pid {p.pid}, rss {p.rss_bytes // MiB} MiB)"


def db_name(db: DbStats) -> str:
    return f"{db.kind} {db.name}"


def session_name(db: DbStats, s: DbSession) -> str:
    found = registry.find(db.kind)
    what = found.session_noun if found else "session"
    return f"{db.kind} {db.name} {what} {s.pid} ({s.user or '?'}, {s.held_bytes // MiB} MiB)"
