"""Who is who among the processes: roles by fact (pids the databases reported), never by name.

Pure: takes what sense read (procs) and what the databases said (DbStats), returns the role
of every pid that has one. OTHER, what most processes are, is left out (`roles.get(pid,
Role.OTHER)`): a host's thousands of ordinary processes cost no entry. A process merely called
"postgres" (its comm or argv) is OTHER; a brand-new backend that pg_stat_activity does not list
yet is a PG_BACKEND from birth, because it is a child of the postmaster. Every descendant of a
database process is DB_CHILD, and a process running a database server executable that no
database claims is DB_UNKNOWN: neither is ever a kill candidate.
"""
from __future__ import annotations

import os
from typing import Iterable

from .databases import registry
from .model import CacheStats, DbStats, Proc, Role

INIT_PID = 1


# A parent's children as a dict used as a set: a set of 5,000 pids (5,000 workers of one
# parent) takes 512 KiB, a dict of them 150 KiB.
Children = dict[int, dict[int, None]]


def _children(procs: dict[int, Proc]) -> Children:
    out: Children = {}
    for pid, proc in procs.items():
        out.setdefault(proc.ppid, {})[pid] = None
    return out


def _database_roles(procs: dict[int, Proc], databases: Iterable[DbStats],
                    children: Children) -> dict[int, Role]:
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
            for pid in sorted(children.get(server_pid, ())):
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


def _descends(procs: dict[int, Proc], heads: set[int]):
    """pid -> whether it is one of `heads` or descends (any depth) from one, memoized."""
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
    return descends


def _family(procs: dict[int, Proc], heads: set[int]) -> set[int]:
    """Every process descended (any depth) from one of `heads`."""
    descends = _descends(procs, heads)
    return {pid for pid, proc in procs.items() if pid not in heads and proc.ppid in procs and descends(proc.ppid)}


def classify(procs: dict[int, Proc], databases: Iterable[DbStats], self_pid: int,
             caches: Iterable[CacheStats] = ()) -> dict[int, Role]:
    """The role of every pid in `procs` that is not OTHER. A cache server is the process listening at its endpoint
    (found by fact, caches/endpoint.py); a database role wins over it."""
    db_roles = _fixed_roles(procs, databases, caches, _children(procs))
    exes = registry.server_executables()
    unknown = {pid for pid, p in procs.items() if pid not in db_roles and _runs_server(pid, p, self_pid, exes)}
    family = _family(procs, _heads(db_roles, unknown))
    return _roles(procs, self_pid, db_roles, unknown, family)


def _roles(procs: dict[int, Proc], self_pid: int, db_roles: dict[int, Role], unknown: set[int],
           family: set[int]) -> dict[int, Role]:
    """{pid: role} of `procs`, OTHER left out."""
    out = {}
    for pid, proc in procs.items():
        role = _role(pid, proc, self_pid, db_roles, pid in unknown, pid in family)
        if role is not Role.OTHER:
            out[pid] = role
    return out


def _fixed_roles(procs: dict[int, Proc], databases: Iterable[DbStats], caches: Iterable[CacheStats],
                 children: Children) -> dict[int, Role]:
    """Roles the databases and caches give by fact (their servers, their reported pids)."""
    db_roles = {c.server_pid: Role.CACHE_SERVER for c in caches if c.server_pid in procs and not c.pooler}
    db_roles.update(_database_roles(procs, databases, children))
    return db_roles


def _runs_server(pid: int, p: Proc, self_pid: int, exes: frozenset[str]) -> bool:
    # A database server no configured database claims (another cluster, MariaDB next to a
    # PostgreSQL-only config, or a server dbguard cannot identify): never a candidate. Erring
    # this way only ever protects a process; a hog cannot rename its /proc/PID/exe.
    return not p.kernel_thread and pid != self_pid and bool(p.exe) and os.path.basename(p.exe) in exes


def _heads(db_roles: dict[int, Role], unknown: set[int]) -> set[int]:
    return {pid for pid, role in db_roles.items() if role.is_database} | unknown


def _role(pid: int, proc: Proc, self_pid: int, db_roles: dict[int, Role], unknown: bool, family: bool) -> Role:
    if proc.kernel_thread:
        return Role.KERNEL_THREAD
    if pid == self_pid:
        return Role.DBGUARD
    if pid in db_roles:
        # Before INIT: in a container the postmaster can be pid 1, and it needs the
        # database's shielding (never signalled either way).
        return db_roles[pid]
    if pid == INIT_PID:
        return Role.INIT
    if unknown:
        return Role.DB_UNKNOWN
    if family:
        # COPY ... TO PROGRAM, archive_command, restore_command, a backup tool's children:
        # killing one fails the database's own work (a standby whose restore_command dies
        # shuts down); their memory is answered through the owning session, by SQL.
        return Role.DB_CHILD
    return Role.OTHER


class Classifier:
    """classify() kept across the cycles of one process table: a role is worked out again only
    where a fact it rests on changed (a process born, gone, or read again with another parent,
    executable or kind; a database's or cache's pids; a server executable claimed or not) and,
    where that changed whether a process descends from a database, below it. The answer is
    classify()'s (tests/unit/test_classify.py compares them over random changes)."""

    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        self.roles: dict[int, Role] = {}
        self.changed: set[int] = set()          # pids whose role was set (or removed) by the last update
        self._children: Children = {}
        self._descends: set[int] = set()        # heads and their descendants
        self._db_roles: dict[int, Role] = {}
        self._server_exe: set[int] = set()      # pids running a server executable (_runs_server)
        self._unknown: set[int] = set()
        self._key: tuple | None = None

    def update(self, procs: dict[int, Proc], databases: Iterable[DbStats], self_pid: int,
               caches: Iterable[CacheStats] = (), changed: set[int] | None = None) -> dict[int, Role]:
        """The roles of `procs`, where `changed` names every pid whose Proc differs from the
        last update's (None: not known, so all are worked out). `procs` is kept, not copied, as
        what the next update compares with: the caller hands over a dict it no longer changes
        (the process table gives a new one each refresh), one dict fewer per process."""
        exes = registry.server_executables()
        if changed is None or self._key != (self_pid, exes):
            self._key = (self_pid, exes)
            self.procs = procs
            self._children = _children(procs)
            self._db_roles = _fixed_roles(procs, databases, caches, self._children)
            self._server_exe = {pid for pid, p in procs.items() if _runs_server(pid, p, self_pid, exes)}
            self._unknown = self._server_exe - self._db_roles.keys()
            self._descends = _heads(self._db_roles, self._unknown)
            self._descends |= _family(procs, self._descends)
            self.roles = _roles(procs, self_pid, self._db_roles, self._unknown, self._descends)
            self.changed = set(procs)
            return self.roles
        roots: set[int] = set()
        before, self.procs = self.procs, procs
        for pid in changed:
            old, new = before.get(pid), procs.get(pid)
            if old is new:
                continue
            if old is not None and new is not None and (old.ppid, old.exe, old.kernel_thread) == \
                    (new.ppid, new.exe, new.kernel_thread):
                continue                        # its memory or score: no role rests on them
            if old is not None:
                siblings = self._children.get(old.ppid)
                if siblings is not None:
                    siblings.pop(pid, None)
                    if not siblings:
                        del self._children[old.ppid]
            if new is not None:
                self._children.setdefault(new.ppid, {})[pid] = None
            if new is not None and _runs_server(pid, new, self_pid, exes):
                self._server_exe.add(pid)
            else:
                self._server_exe.discard(pid)
            roots.add(pid)
            roots.update(self._children.get(pid, ()))     # their parent came or went
        db_roles = _fixed_roles(self.procs, databases, caches, self._children)
        unknown = self._server_exe - db_roles.keys()
        roots |= {pid for pid in db_roles.keys() | self._db_roles.keys() if db_roles.get(pid) != self._db_roles.get(pid)}
        roots |= unknown ^ self._unknown
        self._db_roles, self._unknown = db_roles, unknown
        heads = _heads(db_roles, unknown)
        descends = _descends(self.procs, heads)
        self.changed = set()
        todo = list(roots)
        if todo:
            self.roles = dict(self.roles)       # the one handed out last is never changed: no copy each time
        while todo:
            pid = todo.pop()
            proc = self.procs.get(pid)
            if proc is None:
                was = pid in self._descends
                self._descends.discard(pid)
                if self.roles.pop(pid, None) is not None:
                    self.changed.add(pid)
                if was:
                    todo.extend(self._children.get(pid, ()))
                continue
            # Walked up afresh, never from a neighbour's kept answer: a loop of stale parents
            # would otherwise keep itself a database's family.
            now = descends(pid)
            role = _role(pid, proc, self_pid, db_roles, pid in unknown, now and pid not in heads)
            if self.roles.get(pid, Role.OTHER) is not role:
                if role is Role.OTHER:
                    del self.roles[pid]
                else:
                    self.roles[pid] = role
                self.changed.add(pid)
            if now != (pid in self._descends):
                (self._descends.add if now else self._descends.discard)(pid)
                todo.extend(self._children.get(pid, ()))
        return self.roles
