"""oom_score_adj layers: shield database processes where the kernel lets us lower scores,
and everywhere raise the kill candidates' scores so the kernel's own choice falls on them."""
from __future__ import annotations

from ..settings import Protection
from ..model import Action, ActionKind, Proc, Role, Snapshot
from .state import PolicyState
from .targets import proc_name
from .verdicts import Verdict

# A postmaster and its auxiliaries must never be chosen while anything else is left.
SERVER_OOM_SCORE_ADJ = -1000


def scores(snap: Snapshot, verdicts: dict[int, Verdict], state: PolicyState, prot: Protection,
           can_lower: bool, changed: set[int] | None = None) -> list[Action]:
    """Score changes due. `changed`: the pids whose verdict (process, role) changed since the
    last call, when the caller knows them: the answer for every other process is the one
    already given (an action planned then, or none due), so they are not looked at again."""
    out = []
    procs = snap.procs
    for pid in (procs if changed is None else changed):
        proc = procs.get(pid)
        if proc is None:
            continue
        role = snap.roles.get(pid, Role.OTHER)
        want, why = None, ""
        if role.is_database and prot.lower_databases and can_lower:
            server = role in (Role.POSTMASTER, Role.PG_AUXILIARY)
            want = SERVER_OOM_SCORE_ADJ if server else prot.backend_oom_score_adj
            why = (f"shield {role.value}: the kernel OOM killer must choose anything else first"
                   if server else f"shield {role.value}, yet leave the kernel a way out")
            if proc.oom_score_adj <= want:
                continue
        elif role is Role.OTHER and prot.raise_candidates:
            v = verdicts[pid]
            want = prot.candidate_oom_score_adj
            if not v.candidate or proc.oom_score_adj >= want:
                continue
            why = f"kill candidate ({v.why}): the kernel OOM killer should choose it before the database"
        original, asked = state.scored.get(proc.key, (proc.oom_score_adj, None))
        if want is None or asked == want:
            continue
        state.scored[proc.key] = (original, want)
        out.append(Action(ActionKind.SET_OOM_SCORE_ADJ, why, pid=pid, start_time=proc.start_time,
                          target=proc_name(proc), value=want))
    return out


def newborn(proc: Proc, v: Verdict, state: PolicyState, prot: Protection) -> Action | None:
    """A process born in the watched scope since the last cycle (the kernel reported its fork
    or exec): its score is raised now, whatever its size, unless it is protected. It is no
    database process (the kernel shields those from birth, the caller checks executables):
    if the kernel's own choice comes before the next cycle, it must fall on a newcomer."""
    want = prot.candidate_oom_score_adj
    if not prot.raise_candidates or v.protected or proc.kernel_thread or proc.oom_score_adj >= want:
        return None
    original, asked = state.scored.get(proc.key, (proc.oom_score_adj, None))
    if asked == want:
        return None
    state.scored[proc.key] = (original, want)
    return Action(ActionKind.SET_OOM_SCORE_ADJ,
                  f"new process in the watched cgroup, not protected ({v.why}): scored at birth so the "
                  "kernel OOM killer chooses it before the database", pid=proc.pid, start_time=proc.start_time,
                  target=proc_name(proc), value=want)


def put_back(snap: Snapshot, state: PolicyState, why: str = "dbguard stopping") -> list[Action]:
    """At stop, or when the scope is no longer watched: the scores dbguard raised, back to what
    they were, where they are still ours (a process whose score someone else changed since is
    left as it is)."""
    out = []
    for pid, proc in snap.procs.items():
        original, want = state.scored.get(proc.key, (None, None))
        if want is None or want <= original or proc.oom_score_adj != want:
            continue
        out.append(Action(ActionKind.SET_OOM_SCORE_ADJ, f"{why}: put back the score it raised to {want}",
                          pid=pid, start_time=proc.start_time, target=proc_name(proc), value=original))
    return out
