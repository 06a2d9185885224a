"""Who is who among the processes: roles by fact (pids the databases reported), never by name.

Pure: takes what sense read (procs) and what the databases said (DbStats), returns a role
for every pid. A process merely called "postgres" (its comm or argv) is OTHER; a brand-new
backend that pg_stat_activity does not list yet is a PG_BACKEND from birth, because it is a
child of the postmaster. Every descendant of a database process is DB_CHILD, and a process
running a database server executable that no database claims is DB_UNKNOWN: neither is ever
a kill candidate.
"""
from __future__ import annotations

import os
from typing import Iterable

from .databases import registry
from .model import CacheStats, DbStats, Proc, Role

INIT_PID = 1


def _database_roles(procs: dict[int, Proc], databases: Iterable[DbStats]) -> dict[int, Role]:
    servers: dict[int, Role] = {}
    members: dict[int, Role] = {}
    for db in databases:
        kind = registry.find(db.kind)
        if kind is None or db.server_pid is None or db.server_pid not in procs:
            # No server process we can see: without it, no child is known to be the database's.
            # (verified pids below still apply: a pid the adapter checked by fact is a fact.)
            server_pid = None
        else:
            server_pid = db.server_pid
            servers.setdefault(server_pid, kind.server_role)
        if server_pid is not None:
            default = kind.child_role
            for pid, proc in procs.items():
                if proc.ppid != server_pid:
                    continue
                reported = db.roles.get(pid)
                if reported is not None and reported.is_database:
                    members.setdefault(pid, reported)
                elif default is not None:
                    members.setdefault(pid, default)
        if kind is not None and kind.reported_pids_verified:
            for pid, role in db.roles.items():
                if pid in procs and role.is_database:
                    members.setdefault(pid, role)
    # A server pid is a server even if another database lists it as a child.
    members.update(servers)
    return members


def _family(procs: dict[int, Proc], heads: set[int]) -> set[int]:
    """Every process descended (any depth) from one of `heads`."""
    memo: dict[int, bool] = {pid: True for pid in heads}

    def descends(pid: int) -> bool:
        chain = []
        while pid not in memo:
            chain.append(pid)
            proc = procs.get(pid)
            if proc is None or proc.ppid == pid or len(chain) > len(procs):
                memo[pid] = False
                break
            pid = proc.ppid
        answer = memo[pid]
        for p in chain:
            memo[p] = answer
        return answer

    return {pid for pid, proc in procs.items() if pid not in heads and proc.ppid in procs and descends(proc.ppid)}


def classify(procs: dict[int, Proc], databases: Iterable[DbStats], self_pid: int,
             caches: Iterable[CacheStats] = ()) -> dict[int, Role]:
    """A role for every pid in `procs`. A cache server is the process listening at its endpoint
    (found by fact, caches/endpoint.py); a database role wins over it."""
    db_roles = {c.server_pid: Role.CACHE_SERVER for c in caches if c.server_pid in procs and not c.pooler}
    db_roles.update(_database_roles(procs, databases))
    exes = registry.server_executables()
    # A database server no configured database claims (another cluster, MariaDB next to a
    # PostgreSQL-only config, or a server dbguard cannot identify): never a candidate. Erring
    # this way only ever protects a process; a hog cannot rename its /proc/PID/exe.
    unknown = {pid for pid, p in procs.items() if pid not in db_roles and not p.kernel_thread and pid != self_pid
               and p.exe and os.path.basename(p.exe) in exes}
    family = _family(procs, {pid for pid, role in db_roles.items() if role.is_database} | unknown)
    roles: dict[int, Role] = {}
    for pid, proc in procs.items():
        if proc.kernel_thread:
            roles[pid] = Role.KERNEL_THREAD
        elif pid == self_pid:
            roles[pid] = Role.DBGUARD
        elif pid in db_roles:
            # Before INIT: in a container the postmaster can be pid 1, and it needs the
            # database's shielding (never signalled either way).
            roles[pid] = db_roles[pid]
        elif pid == INIT_PID:
            roles[pid] = Role.INIT
        elif pid in unknown:
            roles[pid] = Role.DB_UNKNOWN
        elif pid in family:
            # COPY ... TO PROGRAM, archive_command, restore_command, a backup tool's children:
            # killing one fails the database's own work (a standby whose restore_command dies
            # shuts down); their memory is answered through the owning session, by SQL.
            roles[pid] = Role.DB_CHILD
        else:
            roles[pid] = Role.OTHER
    return roles
