"""Which hogs to kill now: enough of the first candidates in kill order to bring
unreclaimable usage back under the goal, within the rate limits."""
from __future__ import annotations

from ..assess import Assessment
from ..settings import Kill
from ..model import Action, ActionKind, Level, Proc, Snapshot
from .state import PolicyState
from .targets import pct, proc_name
from .verdicts import Verdict

# The same process is not planned for a second kill this soon: its memory may take a moment
# to show as freed, and in dry-run the process is (rightly) still there.
KILL_REPEAT_AFTER = 10.0


def kills(snap: Snapshot, a: Assessment, ranked: list[tuple[Proc, Verdict]], state: PolicyState,
          k: Kill, tiered: bool, excess: int, answered: bool = False) -> tuple[list[Action], int]:
    """Kills for `excess` bytes over the goal, and the bytes they free. `answered`: another
    answer already acted this cycle (thrashing justifies one answer under the goal)."""
    if a.level < Level.HIGH or not k.enabled or not a.reading.limit_bytes:
        return [], 0
    now = snap.ts
    if state.kill_times and now - state.kill_times[-1] < k.min_interval:
        return [], 0
    recent = sum(1 for t in state.kill_times if now - t < 60)
    # Kill enough to get back under the goal, not just one: with fast hogs, one kill per
    # cycle loses the race. Thrashing justifies one kill even under the goal; a level merely
    # held by hysteresis or dwell does not.
    out: list[Action] = []
    freed = 0
    busy_band = None     # the kill order band of a candidate killed a moment ago and not gone yet
    for proc, v in ranked:
        # A `kill` rule's processes all go once kills are allowed; the rest only until
        # usage is back under the goal.
        if excess - freed <= 0 and (out or answered or not a.thrashing) and v.action != "kill" \
                or recent >= k.max_per_minute:
            break
        if busy_band is not None and v.order != busy_band:
            break        # never reach past a tier whose kill is still under way
        if now - state.killed.get(proc.key, float("-inf")) < KILL_REPEAT_AFTER:
            if v.action != "kill":
                busy_band = v.order
            continue
        state.killed[proc.key] = now
        recent += 1
        freed += proc.rss_bytes
        first = "kill rule match" if v.action == "kill" else \
            f"next kill candidate (tier {v.tier})" if tiered else "largest kill candidate"
        out.append(Action(ActionKind.KILL,
                          f"level {a.level.name.lower()}: {first} ({v.why}); usage must fall below "
                          f"{pct(a.goal)} of the limit",
                          pid=proc.pid, start_time=proc.start_time, target=proc_name(proc)))
    if out:
        state.kill_times.append(now)
    return out, freed
