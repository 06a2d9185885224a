"""`dbguard explain`: one snapshot, its assessment and the plan the policy would carry out
now, with the reason for every process's verdict, without acting; one of each per watched
scope (several when databases on one node each have their own memory limit)."""
from __future__ import annotations

import json
from typing import Any

from .assess import LevelState, assess
from .settings import Config
from .databases.identity import degraded
from .watch import build_policies
from .errors import DbguardError
from .escape import say
from .model import Role
from .policy import PolicyState
from .sensor import Sensor


def explain(cfg: Config) -> list[dict[str, Any]]:
    """For each watched scope, one snapshot and the plan its policy would carry out now,
    without acting."""
    sensor = Sensor(cfg)
    try:
        sensor.open_pressure(sensor.collect())
        build_policies(cfg, sensor.watches, sensor.db_configs, dry_run=True)
        readings = [w.monitor.read() for w in sensor.watches]
        out = []
        for w, snap in zip(sensor.watches, sensor.snapshots(readings, [True] * len(readings))):
            state = PolicyState(levels=LevelState())
            a = assess(snap.memory, cfg.pressure, state.levels, snap.ts)
            plan = w.policy.decide(snap, a, state)
            out.append({"snapshot": snap, "assessment": a, "plan": plan, "policy": w.policy, "cgroup": w.cgroup,
                        "scope": w.scope, "databases": w.databases})
        return out
    finally:
        sensor.close()


TOP_SESSIONS = 5


def _cache_line(c) -> str:
    what = "pooler" if c.pooler else "cache"
    pid = f"server pid {c.server_pid}" if c.server_pid else "server pid not found"
    if not c.up:
        return f"{what} {c.name} ({c.kind}): DOWN ({c.error})" + (f"; {pid}" if c.server_pid else "")
    size = (lambda n: f"{n} connection(s)") if c.unit == "connections" else _mib
    used = "in use" if c.pooler else "used"
    line = (f"{what} {c.name} ({c.kind}): up; {pid}; {used} {size(c.memory)}, limit "
            f"{size(c.limit)} (configured {size(c.configured)}); shrink step {c.shrink_step}/{c.shrink_steps_max}")
    if not c.pooler:
        hits = "-" if c.hit_ratio is None else f"{c.hit_ratio:.3f}"
        line += f"; evictions {c.evictions}; hit ratio {hits}"
    return line + (f"; left alone: {c.why_not}" if c.why_not else "") + (
        f"; next step waits: {c.held}" if c.held else "")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def top_sessions(d, n: int = TOP_SESSIONS) -> list:
    """The sessions holding the most (private memory + temporary files), largest first."""
    return sorted(d.sessions, key=lambda s: -s.held_bytes)[:n]


def _session_json(s) -> dict[str, Any]:
    # Never the statement's text: it may carry literals (names, secrets) explain's reader must not see.
    return {"pid": s.pid, "kind": s.kind, "state": s.state, "user": s.user, "memory_bytes": s.memory_bytes,
            "temp_bytes": s.temp_bytes, "running_seconds": round(s.age_seconds, 1), "client": s.client}


def print_explanation(scopes: list[dict[str, Any]], *, only_pid: int | None = None, as_json: bool = False) -> int:
    """One scope as ever; several: each in turn (JSON: {"scopes": [...]}, each of the one-scope shape)."""
    if only_pid is not None:
        held = [out for out in scopes if only_pid in out["snapshot"].procs]
        scopes = held[:1] or scopes[:1]
    if len(scopes) == 1:
        return _print_scope(scopes[0], only_pid=only_pid, as_json=as_json)
    if as_json:
        print(json.dumps({"scopes": [_as_json(out, _rows(out)) for out in scopes]}, indent=2))
        return 0
    for i, out in enumerate(scopes, 1):
        say(f"=== scope {i} of {len(scopes)}: {out['cgroup'] or 'host'} (databases: "
            f"{', '.join(out['databases']) or 'none'})")
        _print_scope(out)
    return 0


def _rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Each process of the scope with its verdict, the reason and where it stands."""
    snap, policy = out["snapshot"], out["policy"]
    order = {p.pid: i for i, p in enumerate(policy.candidates(snap), 1)}
    kernel = policy.kernel_view(snap)
    verdicts = policy.verdicts(snap)     # the plan's own verdicts: PSS is not read a second time
    rows = []
    for pid, proc in sorted(snap.procs.items()):
        role = snap.roles.get(pid, Role.OTHER)
        v = verdicts[pid]
        rows.append({"pid": pid, "comm": proc.comm, "role": role.value, "rss_bytes": proc.rss_bytes,
                     "pss_bytes": v.pss_bytes, "oom_score_adj": proc.oom_score_adj, "memcg": proc.memcg,
                     "exe": proc.exe,
                     "verdict": "protected" if v.protected else "candidate" if v.candidate else "left alone",
                     "preferred": v.preferred, "why": v.why, "rule": v.rule, "rule_index": v.rule_index,
                     "action": v.action, "tier": v.tier, "tier_source": v.tier_source, "weight": v.weight,
                     "kill_order": order.get(pid),
                     "kernel": "shield" if pid in kernel.protected else
                               "candidate" if pid in kernel.candidates else "none"})
    return rows


def _as_json(out: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    snap, plan = out["snapshot"], out["plan"]
    m = snap.memory
    return {
        "memory": {"cgroup": m.cgroup or "host", "scope": out["scope"].why if out.get("scope") else "",
                   "usage_bytes": m.usage_bytes, "limit_bytes": m.limit_bytes,
                   "reclaimable_bytes": m.reclaimable_bytes, "pending_bytes": m.pending_bytes,
                   "psi_some_avg10": m.psi_some_avg10, "psi_full_avg10": m.psi_full_avg10},
        "level": plan.level.name.lower(), "level_reason": plan.level_reason,
        "degraded": list(degraded(snap.databases).values()),
        "databases": [{"name": d.name, "kind": d.kind, "up": d.up, "error": d.error, "server_pid": d.server_pid,
                       "identity": d.identity,
                       "cache_bytes": d.cache_bytes, "hit_ratio": d.hit_ratio, "shrink_step": d.shrink_step,
                       "shrink_steps_max": d.shrink_steps_max, "sessions": len(d.sessions),
                       "top_sessions": [_session_json(x) for x in top_sessions(d)]}
                      for d in snap.databases],
        "caches": [{"name": c.name, "kind": c.kind, "pooler": c.pooler, "up": c.up, "error": c.error,
                    "server_pid": c.server_pid, "unit": c.unit, "memory": c.memory, "limit": c.limit,
                    "configured": c.configured, "shrink_step": c.shrink_step,
                    "shrink_steps_max": c.shrink_steps_max, "evictions": c.evictions,
                    "hit_ratio": c.hit_ratio, "left_alone": c.why_not, "next_step_waits": c.held}
                   for c in snap.caches],
        "processes": rows,
        "plan": [{"action": x.kind.value, "target": x.target, "reason": x.reason, "pid": x.pid,
                  "value": x.value} for x in plan.actions],
        "deferred": [{"target": t, "reason": why} for t, why in plan.deferred]}


def _print_scope(out: dict[str, Any], *, only_pid: int | None = None, as_json: bool = False) -> int:
    snap, plan, policy = out["snapshot"], out["plan"], out["policy"]
    rows = _rows(out)
    n_candidates = sum(1 for r in rows if r["kill_order"])
    if only_pid is not None:
        rows = [r for r in rows if r["pid"] == only_pid]
        if not rows:
            raise DbguardError(f"explain --pid {only_pid}: no such process (it may have exited)")
    m = snap.memory
    if as_json:
        print(json.dumps(_as_json(out, rows), indent=2))
        return 0
    if only_pid is not None:
        r = rows[0]
        say(f"pid {r['pid']} ({r['comm']}): {r['verdict']}{' (preferred)' if r['preferred'] else ''} - {r['why']}")
        pss = "" if r["pss_bytes"] is None else f", pss {_mib(r['pss_bytes'])}"
        say(f"  role {r['role']}, rss {_mib(r['rss_bytes'])}{pss}, oom_score_adj {r['oom_score_adj']}, "
              f"memory cgroup {r['memcg']}, exe {r['exe'] or '?'}")
        given = "" if r["tier_source"] == r["rule"] else f" from {r['tier_source']}"
        say(f"  decided by {r['rule']}: action {r['action'] or 'none'}, tier {r['tier']}{given} "
              f"(kill order of tiers: {' < '.join(policy.rules.tiers)})")
        if r["kill_order"]:
            say(f"  kill order now: {r['kill_order']} of {n_candidates} candidate(s)")
        say("  in the kernel (BPF maps): " + {
            "shield": "shielded (never killed there; a kernel OOM kill of it is reported as a breach)",
            "candidate": "kill candidate (killed as it allocates once reclaim keeps failing at the kill level)",
            "none": "not listed" + (" (a later tier: listed once the earlier candidates are gone)"
                                    if r["kill_order"] else "")}[r["kernel"]])
        mine = [x for x in plan.actions if x.pid == only_pid]
        for x in mine:
            say(f"  now: {x.kind.value}: {x.reason}")
        if not mine:
            say(f"  now (level {plan.level.name.lower()}): nothing would be done to it")
        return 0
    say(f"memory: {m.cgroup or 'host'}: usage {_mib(m.usage_bytes)} of {_mib(m.limit_bytes)}, "
          f"reclaimable {_mib(m.reclaimable_bytes)}, "
          + (f"allocated by sessions and not yet touched {_mib(m.pending_bytes)}, " if m.pending_bytes else "")
          + f"PSI some {m.psi_some_avg10:.1f}% full {m.psi_full_avg10:.1f}%")
    if out.get("scope"):
        say(f"scope: {out['scope'].why}")
    say(f"level: {plan.level.name.lower()} - {plan.level_reason}")
    for d in snap.databases:
        state = "up" if d.up else f"DOWN ({d.error})"
        say(f"database {d.name} ({d.kind}): {state}; server pid {d.server_pid} ({d.identity}); cache {_mib(d.cache_bytes)}"
              f"; hit ratio {'-' if d.hit_ratio is None else f'{d.hit_ratio:.3f}'}; shrink step "
              f"{d.shrink_step}/{d.shrink_steps_max}; {len(d.sessions)} session(s)")
        if d.identity:
            say(f"  server {'found by' if d.server_pid else 'not found'}: {d.identity}")
        for x in top_sessions(d):
            temp = f" + temp files {_mib(x.temp_bytes)}" if x.temp_bytes else ""
            say(f"  session {x.pid} {x.kind} ({x.user or '?'}, {x.state or '?'}"
                f"{'' if x.client else ', system: never ended'}): {_mib(x.memory_bytes)}{temp}, "
                f"{'statement' if x.state == 'active' else 'state'} since {x.age_seconds:.0f}s")
    if not snap.databases:
        say("databases: none configured or found")
    for line in degraded(snap.databases).values():
        say(f"degraded: {line}")
    for c in snap.caches:
        say(_cache_line(c))
    by_role: dict[str, list[int]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append(r["rss_bytes"])
    say("memory by process class (RSS; shared buffers count in every process that touched them): " + ", ".join(
        f"{role} {len(v)} procs {_mib(sum(v))}" for role, v in sorted(by_role.items()) if role != "kernel_thread"))
    shown = [r for r in rows if r["role"] not in ("kernel_thread",) and
             (r["verdict"] != "left alone" or r["rss_bytes"] >= 16 * 2**20)]
    say(f"processes ({len(shown)} shown of {len(rows)}: protected, candidates, and others over 16 MiB; "
          f"tiers {' < '.join(policy.rules.tiers)}; #N = kill order, K = in-kernel candidate):")
    for r in sorted(shown, key=lambda r: (r["verdict"], r["kill_order"] or 0, -r["rss_bytes"])):
        pos = f"#{r['kill_order']}" if r["kill_order"] else ""
        k = "K" if r["kernel"] == "candidate" else ""
        say(f"  {r['pid']:>7} {r['comm'][:15]:<15} {_mib(r['rss_bytes']):>9} adj {r['oom_score_adj']:>5} "
              f"{r['verdict']:<10} {pos:>4}{k:1} {r['tier'][:10]:<10} "
              f"{'' if r['why'].startswith(r['rule']) else r['rule'] + ': '}{r['why']}")
    say("plan:" if plan.actions else "plan: nothing to do at this level")
    for x in plan.actions:
        say(f"  {x.kind.value} {x.target}: {x.reason}")
    for target, why in plan.deferred:
        say(f"  put off {target}: {why}")
    return 0


