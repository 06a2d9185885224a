"""The scope that can run out: where the memory limit that applies to a database really is.

On a stock systemd host PostgreSQL runs in `postgresql@15-main.service` with no limit of its
own: the limit that bites is a parent slice's, or the host's RAM, and the hogs live in sibling
units. Watching the database's own unlimited cgroup would see "usage 102 MiB of -" forever
while the kernel OOM-kills the database. So the watched scope is the cgroup, from the
database's own up to the root, whose limit is the tightest (the first one met going up, when
several are equal: the smallest subtree holding the limit), or the host when no cgroup up the
tree is limited. Every process in that scope is a candidate, siblings included.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

from ..errors import DbguardError
from .memtext import MEMINFO, parse_limit, parse_meminfo
from .procfs import CGROUP_ROOT, memcg_dir, parse_memcg

P = TypeVar("P")


@dataclass(frozen=True)
class Scope:
    cgroup_dir: str            # the watched memory cgroup's directory; "" for the host
    limit_bytes: int | None    # its limit; None for the host (MemTotal is the bound)
    why: str                   # one line for the start log, explain and check

    @property
    def name(self) -> str:
        """What the audit, the metrics and the logs call it."""
        return self.cgroup_dir or "host"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _own_limit(cgroup_dir: str, version: int, mem_total: int) -> int | None:
    """The limit set on this cgroup itself (not inherited), None when it sets none."""
    name = "memory.limit_in_bytes" if version == 1 else "memory.max"
    try:
        return parse_limit(_read(os.path.join(cgroup_dir, name)), mem_total)
    except (FileNotFoundError, ValueError):
        return None


def limit_chain(cgroup_dir: str, version: int, mem_total: int, root: str) -> list[tuple[str, int | None]]:
    """(directory, own limit) from `cgroup_dir` up to the hierarchy's root, nearest first."""
    chain = []
    d = cgroup_dir.rstrip("/")
    while True:
        chain.append((d, _own_limit(d, version, mem_total) if d != root else None))
        if d == root or not d.startswith(root + "/"):
            return chain
        d = os.path.dirname(d)


def tightest(chain: list[tuple[str, int | None]]) -> tuple[str, int] | None:
    """The directory holding the smallest limit (nearest wins a tie), None when none is set."""
    best = None
    for d, limit in chain:
        if limit is not None and (best is None or limit < best[1]):
            best = (d, limit)
    return best


def _fmt(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def scope_of(pid: int, proc_root: str = "/proc", cgroup_root: str = CGROUP_ROOT) -> Scope:
    """The scope that can run out for the process `pid` (a database server)."""
    try:
        path, version = parse_memcg(_read(f"{proc_root}/{pid}/cgroup"))
    except (FileNotFoundError, ProcessLookupError):
        raise DbguardError(f"process {pid} does not exist; cannot find its memory cgroup") from None
    mem_total = parse_meminfo(_read(MEMINFO))["MemTotal"]
    if version == 0:
        return Scope("", None, "no memory cgroup on this host: watching the host's RAM")
    own = memcg_dir(path, version, cgroup_root)
    root = memcg_dir("/", version, cgroup_root)
    found = tightest(limit_chain(own, version, mem_total, root))
    if found is None:
        return Scope("", None, f"no memory limit on {own} or any cgroup above it: watching the host's RAM "
                               f"({_fmt(mem_total)})")
    d, limit = found
    if d == own:
        return Scope(d, limit, f"the database's own memory cgroup holds the limit ({_fmt(limit)})")
    return Scope(d, limit, f"the tightest limit above the database's cgroup {own} is {_fmt(limit)} on {d}: "
                           "watching all of it, siblings included")


def covers(watched: Scope, other: Scope) -> bool:
    """Whether watching `watched` also sees `other`'s memory: the host covers every scope, a
    cgroup covers itself and the cgroups below it."""
    w = watched.cgroup_dir.rstrip("/")
    o = other.cgroup_dir.rstrip("/")
    return not w or o == w or o.startswith(w + "/")


def unwatched(watched: Scope, others: dict[str, Scope]) -> str:
    """One line naming the databases whose own limit lies outside the scope [pressure] cgroup
    sets, '' when there are none."""
    missed = [f"{name} ({s.cgroup_dir}, {_fmt(s.limit_bytes) if s.limit_bytes else 'no limit'})"
              for name, s in others.items() if not covers(watched, s)]
    if not missed:
        return ""
    return (f"not watched: the memory limit of {', '.join(missed)}; set [pressure] cgroup to a cgroup "
            "above all of them, or leave it unset to watch each database's own scope")


HOST = Scope("", None, "no database server identified yet: watching the host's RAM")


def group(own: dict[str, Scope | None]) -> list[tuple[Scope, tuple[str, ...]]]:
    """The scopes to watch and the databases each answers, from each database's own scope
    (scope_of; None: its server is not identified, so where its limit lies is unknown: the
    host). Databases whose scopes are the same cgroup share it; first seen first; the host
    alone when there are no databases."""
    out: dict[str, tuple[Scope, list[str]]] = {}
    for name, s in own.items():
        s = s or HOST
        out.setdefault(s.cgroup_dir, (s, []))[1].append(name)
    if not out:
        return [(HOST, ())]
    return [(s, tuple(names)) for s, names in out.values()]


def owner(memcg: str, scopes: list[str | None]) -> int:
    """Index of the innermost scope (relative memcg paths, None for the host) holding a process
    of memory cgroup `memcg`; 0 when none does (the single-scope case: its judge leaves such a
    process alone as outside the watched cgroup)."""
    best, depth = 0, -2
    for i, s in enumerate(scopes):
        if not s or s == "/":
            d = -1
        elif memcg == s or memcg.startswith(s.rstrip("/") + "/"):
            d = s.rstrip("/").count("/")
        else:
            continue
        if d > depth:
            best, depth = i, d
    return best


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


def held(procs: dict[int, P], scopes: list[str | None]) -> list[dict[int, P]]:
    """`procs` (anything with a `memcg`) split by the scope that answers for each (`owner`)."""
    out: list[dict[int, P]] = [{} for _ in scopes]
    for pid, proc in procs.items():
        out[owner(proc.memcg, scopes)][pid] = proc
    return out


def configured(cgroup_dir: str) -> Scope:
    """[pressure] cgroup, as the operator set it."""
    d = cgroup_dir.rstrip("/")
    return Scope(d, None, f"set by [pressure] cgroup = {d}")
