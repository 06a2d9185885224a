"""Carry out a Plan: safety checks first, then the action, then its audit record and metric.

The safety rules are checked here again, against the processes as they are now, whatever
the policy said: never PID 1, a kernel thread, dbguard, or any process of a database
(a PostgreSQL backend killed by a signal takes every session down with it).
"""
from __future__ import annotations

import logging
from typing import Callable

from ..audit import AuditLog
from ..databases.base import Database
from ..model import Action, ActionKind, Level, Plan, ProcKey, Role, Snapshot
from ..sense.procfs import read_proc
from . import process

log = logging.getLogger("dbguard")


def refusal(a: Action, snap: Snapshot) -> str | None:
    """Why `a` must not be carried out, or None. Pure but for the fresh read of the target."""
    if a.kind not in (ActionKind.KILL, ActionKind.SET_OOM_SCORE_ADJ):
        return None
    if a.pid is None or a.start_time is None:
        return "no process identity (pid and start time) given"
    role = snap.roles.get(a.pid, Role.OTHER)
    if a.kind is ActionKind.SET_OOM_SCORE_ADJ and role.is_database and (a.value or 0) > 0:
        return f"{role.value}: a database process's score is only ever lowered"
    if a.kind is ActionKind.KILL:
        if role.never_signalled:
            return f"{role.value} is never signalled"
        try:
            process.check_killable(a.pid)
        except process.Refused as e:
            return str(e)
        now = read_proc(a.pid)
        if now is None or now.start_time != a.start_time:
            return None      # gone or reused: process.kill() says so without touching it
        if now.kernel_thread:
            return "kernel thread"
        servers = {db.server_pid for db in snap.databases if db.server_pid}
        if now.ppid in servers:
            return "it is now a child of a database server (a new backend): never signalled"
    return None


class Executor:
    def __init__(self, databases: dict[str, Database], audit: AuditLog,
                 observe: Callable[[Action, bool], None] | None = None,
                 still_pressed: Callable[[], str | None] | None = None):
        self.databases = databases
        self.audit = audit
        self.observe = observe or (lambda a, ok: None)
        # Read right before each kill: None while the kill is still needed, else why not.
        # The memory a previous kill of the same round released may already be enough.
        self.still_pressed = still_pressed or (lambda: None)

    def execute(self, plan: Plan, snap: Snapshot) -> list[dict]:
        return [self.one(a, plan.level, snap) for a in plan.actions]

    def one(self, a: Action, level: Level, snap: Snapshot) -> dict:
        why_not = refusal(a, snap)
        if why_not is not None:
            rec = self.audit.action(a, level, f"refused: {why_not}", False)
            self.observe(a, False)
            return rec
        if a.dry_run:
            rec = self.audit.action(a, level, "dry_run: not carried out", True)
            self.observe(a, True)
            return rec
        if a.kind is ActionKind.KILL:
            relieved = self.still_pressed()
            if relieved is not None:
                rec = self.audit.action(a, level, f"skipped: pressure fell before the kill ({relieved})", True)
                self.observe(a, True)
                return rec
        log.debug("carrying out %s on %s", a.kind.value, a.target)
        try:
            ok, result = self._carry_out(a)
        except process.Refused as e:
            ok, result = False, f"refused: {e}"
        except OSError as e:
            ok, result = False, f"failed: {e.strerror or e}"
        rec = self.audit.action(a, level, result, ok)
        self.observe(a, ok)
        return rec

    def _carry_out(self, a: Action) -> tuple[bool, str]:
        if a.kind is ActionKind.KILL:
            result = process.kill(ProcKey(a.pid, a.start_time))
            return result.startswith("killed"), result
        if a.kind is ActionKind.SET_OOM_SCORE_ADJ:
            result = process.set_oom_score_adj(ProcKey(a.pid, a.start_time), a.value)
            return result.startswith("oom_score_adj set"), result
        db = self.databases.get(a.database or "")
        if db is None:
            return False, f"failed: no database named {a.database!r}"
        if a.kind is ActionKind.CANCEL_QUERY:
            out = db.cancel(a.pid)
        elif a.kind is ActionKind.TERMINATE_SESSION:
            out = db.terminate(a.pid)
        else:       # SHRINK_CACHE, RESTORE_CACHE
            out = db.set_shrink_step(a.value)
        return out.ok, out.detail if out.ok else f"failed: {out.detail}"
