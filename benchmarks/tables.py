"""The benchmark report's tables and computed observations, from the runs in results.json:
one row per contender, figures as median (min-max) over its runs (benchmarks.stats).
"""
from __future__ import annotations

from collections import defaultdict

from .stats import count_true, fmt_spread, markdown_table, ms, spread

ORDER = ("none", "pg-documented", "mariadb-documented", "earlyoom", "dbguard-user", "dbguard-bpf")
PRESSURE_SCENARIOS = ("moderate-hogs", "parent-limit", "moderate-hogs-mariadb", "fast-hog", "fast-hogs", "runaway",
                      "sessions", "sessions-mariadb")
def group(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    g: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        g[(r["scenario"], r["contender"])].append(r)
    return g


def contenders_in(groups, scenario: str) -> list[str]:
    present = {c for (s, c) in groups if s == scenario}
    return [c for c in ORDER if c in present] + sorted(present - set(ORDER))


def ok_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not r.get("error")]


def _survived(runs: list[dict]) -> str:
    yes, n = count_true(r.get("db_survived") for r in runs)
    return f"{yes}/{n}" if n else "–"


def _killed(runs: list[dict], scenario: str) -> str:
    """What ended, as median counts: hogs (or the runaway) vs database processes."""
    if "large_finished" in runs[0]:
        txt = ("large queries finished " + fmt_spread(r.get("large_finished") for r in runs)
               + ", cancelled " + fmt_spread(r.get("large_cancelled") for r in runs)
               + ", terminated " + fmt_spread(r.get("large_terminated") for r in runs)
               + ", failed " + fmt_spread(r.get("large_failed") for r in runs))
    elif scenario == "runaway":
        outcomes = defaultdict(int)
        for r in runs:
            outcomes[r.get("runaway_outcome", "?")] += 1
        txt = ", ".join(f"{k} ×{v}" if len(runs) > 1 else k for k, v in outcomes.items())
    else:
        txt = f"hogs {fmt_spread(r.get('hogs_killed') for r in runs)} of {runs[0].get('hogs', '?')}"
    db = fmt_spread(r.get("db_processes_killed") for r in runs)
    return f"{txt}; database processes {db}"


def carried_out(a: dict) -> bool:
    """Whether an audited action was carried out (not refused, failed, skipped or a dry run's)."""
    return not str(a.get("result") or "").lower().startswith(("refused", "dry_run", "failed", "would", "skipped"))


def guard_ends(actions: list[dict]) -> tuple[int, int, int]:
    """(user-space kills, in-kernel BPF kills, queries/sessions ended by SQL) the guard carried out."""
    done = carried_out
    user = sum(1 for a in actions if a.get("action") == "kill" and a.get("path") != "bpf" and done(a))
    bpf = sum(1 for a in actions if a.get("action") == "kill" and a.get("path") == "bpf" and done(a))
    sql = sum(1 for a in actions if a.get("action") in ("cancel_query", "terminate_session") and done(a))
    return user, bpf, sql


def _ends(runs: list[dict]) -> str:
    if not any(r.get("guard_actions") for r in runs):
        return "–"
    per = [guard_ends(r.get("guard_actions", [])) for r in runs]
    return " / ".join(fmt_spread(x[i] for x in per) for i in range(3))


def pressure_rows(groups, scenario: str, *, full: bool) -> list[list[str]]:
    rows = []
    for c in contenders_in(groups, scenario):
        all_runs = groups[(scenario, c)]
        runs = ok_runs(all_runs)
        if not runs:
            rows.append([c, f"failed ({all_runs[0].get('error', '?')[:80]})"] + ["–"] * (8 if full else 5))
            continue
        row = [c, _survived(runs),
               fmt_spread(r.get("crash_recoveries") for r in runs),
               fmt_spread(r.get("sessions_lost") for r in runs),
               fmt_spread((r.get("tps_ratio") for r in runs), "{:.2f}"),
               fmt_spread((ms(r.get("time_to_first_kill")) for r in runs), "{:.0f}", " ms"),
               _killed(runs, scenario)]
        if full:
            row[4:4] = [fmt_spread(r.get("tx_failed") for r in runs)]
            row += [fmt_spread(r.get("kernel_oom_kills") for r in runs),
                    _ends(runs),
                    f"{len(runs)}" + (f" (+{len(all_runs) - len(runs)} failed)" if len(all_runs) > len(runs) else "")]
        rows.append(row)
    return rows


FASTHOGS_HEADER = ["contender", "rounds", "rounds with a kernel OOM kill", "crash recoveries",
                   "server and pgbench up after every round", "guard's kills: BPF (for a stuck task) / user space",
                   "kernel OOM kills (cgroup counter)"]


def fasthogs_rows(groups, scenario: str) -> list[list[str]]:
    """One row per contender, summed over its runs' rounds (scenario_fasthogs.py): the kernel's
    own counters and the guard's own audit records."""
    rows = []
    for c in contenders_in(groups, scenario):
        rounds = [r for run in ok_runs(groups[(scenario, c)]) for r in run.get("rounds", [])]
        if not rounds:
            continue
        g = {p: sum(r["guard_kills"].get(p, 0) for r in rounds) for p in ("bpf", "bpf_for_other", "user")}
        rows.append([c, len(rounds),
                     sum(bool(r["kernel_oom_kills"] or r["kmsg_victims"]) for r in rounds),
                     sum(r["crash_recoveries"] for r in rounds),
                     f"{sum(r['server_up'] and r['pgbench_running'] for r in rounds)}/{len(rounds)}",
                     f"{g['bpf']} ({g['bpf_for_other']}) / {g['user']}",
                     sum(r["kernel_oom_kills"] for r in rounds)])
    return rows


PRESSURE_HEADER_SHORT = ["contender", "database survived", "crash recoveries", "sessions lost",
                         "throughput vs baseline", "limit → first kill", "what was ended"]
PRESSURE_HEADER_FULL = ["contender", "database survived", "crash recoveries", "sessions lost", "failed transactions",
                        "throughput vs baseline", "limit → first kill", "what was ended", "kernel OOM kills",
                        "guard kills user / BPF / SQL ends", "runs"]


def fork_rows(groups) -> list[list[str]]:
    rows = []
    base = spread(r.get("connections_per_s") for r in ok_runs(groups.get(("fork-storm", "none"), [])))
    for c in contenders_in(groups, "fork-storm"):
        runs = ok_runs(groups[("fork-storm", c)])
        if not runs:
            rows.append([c, "failed", "–", "–", "–"])
            continue
        rate = spread(r.get("connections_per_s") for r in runs)
        rel = f"{rate.median / base.median:.2f}" if rate and base and base.median else "–"

        def cov(key: str) -> str:
            vals = [r["coverage"].get(key) for r in runs if r.get("coverage")]
            held = runs[0].get("coverage", {}).get("held", "?")
            s = spread(vals)
            return "–" if s is None else f"{s.fmt()} of {held}"
        protected = cov("bpf_at_birth") if any("bpf_at_birth" in r.get("coverage", {}) for r in runs) else \
            cov("lowered_score_at_birth")
        later = cov("bpf_after_1_5s") if any("bpf_after_1_5s" in r.get("coverage", {}) for r in runs) else \
            cov("lowered_score_after_1_5s")
        rows.append([c, rate.fmt() if rate else "–", rel, protected, later])
    return rows


def _pool(r: dict) -> str:
    """"512 → 128 → 512 MiB" (configured → smallest seen → at the end), or the server's fate."""
    if r.get("pool_configured_mib") is None:
        return "–"
    end = f"{r['pool_final_mib']} MiB" if r.get("pool_final_mib") is not None else "server down"
    return f"{r['pool_configured_mib']} → {r.get('pool_min_mib')} → {end}"


def _count_runs(runs: list[dict], pred) -> str:
    return f"{sum(1 for r in runs if pred(r))}/{len(runs)}"


def mariadb_rows(groups, scenario: str) -> list[list[str]]:
    """What happened to mariadbd and its buffer pool, per contender."""
    rows = []
    for c in contenders_in(groups, scenario):
        runs = ok_runs(groups[(scenario, c)])
        if not runs:
            continue
        pools = sorted({_pool(r) for r in runs})
        shrunk = [r for r in runs if (r.get("pool_min_mib") or 0) < (r.get("pool_configured_mib") or 0)]
        rows.append([
            c,
            _count_runs(runs, lambda r: r.get("db_processes_killed")),
            fmt_spread((ms(r.get("first_kill_at")) for r in runs), "{:.0f}", " ms"),
            fmt_spread(r.get("db_restarts") for r in runs),
            _count_runs(runs, lambda r: r.get("db_up_at_end")),
            fmt_spread(r.get("tx_failed") for r in runs),
            "; ".join(pools) if len(pools) <= 2 else f"{pools[0]} … ({len(pools)} outcomes)",
            (f"{len(shrunk)}/{len(runs)}; back at the configured size in "
             + fmt_spread((r.get("pool_back_after_s") for r in shrunk), "{:.0f}", " s")
             + (f" ({sum(1 for r in shrunk if r.get('pool_back_after_s') is None)} not)"
                if any(r.get("pool_back_after_s") is None for r in shrunk) else "")) if shrunk else "no",
            fmt_spread((r.get("usage_at_load_mib") for r in runs), unit=" MiB"),
        ])
    return rows


MARIADB_HEADER = ["contender", "mariadbd killed (runs)", "hogs' start → first kill", "restarts (supervisor)",
                  "up at the end",
                  "client errors (queries failed)", "buffer pool: configured → smallest → final",
                  "pool shrunk; grown back after the hogs", "cgroup usage when the hogs start"]


FORK_HEADER = ["contender", "connections/s (fork+exit each)", "vs none", "children protected at birth",
               "after 1.5 s"]


def cost_rows(data: dict) -> list[list[str]]:
    rows = []
    groups = group(data.get("runs", []))
    # CPU under pressure from the scenarios measured in the same invocation (same machine) as the
    # cost extra, when results.json merges several.
    prov = data.get("provenance") or {}
    when = prov.get("cost", {}).get("date")
    scens = [s for s in PRESSURE_SCENARIOS if when is None or prov.get(s, {}).get("date") in (None, when)]
    for c in ("dbguard-user", "dbguard-bpf"):
        runs = [r for s in scens for r in ok_runs(groups.get((s, c), []))]
        cost = data.get("cost", {}).get(c, {})
        if not runs and not cost:
            continue
        by_extra: dict[int, list[dict]] = {}
        for r in cost.get("runs", []):
            by_extra.setdefault(r.get("extra_processes", 0), []).append(r)
        for extra, these in sorted(by_extra.items()) or [(0, [])]:
            rows.append([
                c + (f", +{extra:,} idle processes" if extra else ""),
                fmt_spread((r.get("cpu_idle_pct") for r in these), "{:.1f}", " %")
                if these else fmt_spread((r.get("guard_cpu_idle_pct") for r in runs), "{:.1f}", " %"),
                fmt_spread((r.get("guard_cpu_pressure_pct") for r in runs), "{:.1f}", " %") if not extra else "",
                fmt_spread((r.get("rss_steady_mib") for r in these), "{:.0f}", " MiB"),
                fmt_spread((r.get("rss_anon_mib") for r in these), "{:.0f}", " MiB"),
                fmt_spread((r.get("rss_peak_mib") for r in these), "{:.0f}", " MiB"),
                fmt_spread((ms(r.get("startup_s")) for r in these), "{:.0f}", " ms"),
                fmt_spread((ms(_attached(r, c, "attached_s", "startup_s")) for r in these), "{:.0f}", " ms"),
                fmt_spread((ms(r.get("restart_s")) for r in these), "{:.0f}", " ms"),
                fmt_spread((ms(_attached(r, c, "restart_attached_s", "restart_s")) for r in these), "{:.0f}", " ms"),
            ])
    return rows


def _attached(run: dict, contender: str, key: str, start_key: str) -> float | None:
    """Seconds to "kernel path attached"; a BPF run recorded before the kernel path was
    attached after the start has none of its own: its "protecting" waited for it."""
    if key in run or contender != "dbguard-bpf":
        return run.get(key)
    return run.get(start_key)


def cost_before_attach(data: dict) -> bool:
    """Whether cost `data` was recorded when "protecting" still waited for the kernel path."""
    return any("startup_s" in r and "attached_s" not in r for r in data.get("dbguard-bpf", {}).get("runs", []))


COST_HEADER = ["dbguard", "CPU idle (1 core = 100 %)", "CPU under pressure", "RSS steady",
               "of which anonymous", "RSS peak (VmHWM)", "startup to \"protecting\" (BPF compiled)",
               "startup to \"kernel path attached\"", "restart to \"protecting\" (compiled programs kept)",
               "restart to \"kernel path attached\""]


def run_notes(groups, scenario: str) -> list[str]:
    out = []
    for c in contenders_in(groups, scenario):
        seen = []
        for r in groups[(scenario, c)]:
            for n in r.get("notes", []):
                if n.split(":")[0] not in [s.split(":")[0] for s in seen]:   # one per kind of note
                    seen.append(n)
        out += [f"- {c}: {n}" for n in seen[:3]]
    return out


def rate_by_pool(runs: list[dict], min_seconds: int = 3) -> dict[int, tuple[float, int]]:
    """pool size (MiB) -> (median queries/s, seconds) over the pressure window's seconds, each
    second taken at the pool size sampled at its middle; sizes seen for fewer seconds are left out."""
    per: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        pool = r.get("pool_samples") or []
        prm = r.get("params") or {}
        window = (prm.get("duration") or 0) - (prm.get("warmup") or 0)
        for t, q in r.get("tps_progress", []):
            if not (1 <= t <= window):
                continue
            sizes = [b for tt, b in pool if tt <= t - 0.5]
            if sizes:
                per[sizes[-1]].append(q)
    return {size: (spread(qs).median, len(qs)) for size, qs in per.items() if len(qs) >= min_seconds}


def pool_moves(groups, scenario: str) -> list[str]:
    """How often dbguard resized the buffer pool while hogs were alive (before the benchmark
    ended them), from its audit records: shrinks, and grows that a later shrink undid."""
    out = []
    for c in ("dbguard-user", "dbguard-bpf"):
        runs = ok_runs(groups.get((scenario, c), []))
        if not runs:
            continue
        downs, ups, late = [], [], []
        for r in runs:
            end = next((t for t, what in r.get("timeline", []) if what.startswith("hogs left ended")), None)
            acts = [a for a in r.get("guard_actions", []) if end is None or a.get("t", 0) < end]
            downs.append(sum(1 for a in acts if a.get("action") == "shrink_cache"))
            # "restore_cache" was a grow step's name in results recorded before grow_cache existed
            ups.append(sum(1 for a in acts if a.get("action") in ("grow_cache", "restore_cache")))
            if end is not None:
                for a in r.get("guard_actions", []):
                    if a.get("action") == "shrink_cache" and a.get("t", 0) >= end:
                        before = [x["usage_mib"] for x in r.get("samples", []) if x["t"] <= a["t"]]
                        late.append((a.get("level"), before[-1] if before else None))
        line = (f"{scenario}, {c}: while hogs were alive dbguard shrank the buffer pool {fmt_spread(downs)} time(s) "
                f"and grew it {fmt_spread(ups)} time(s) per run")
        if sum(ups) and sum(downs) > 3 * len(runs):
            line += (" (more shrinks than the 3 steps to the floor: after its kills, a one-step grow at level ok "
                     "pushed usage back over the warn mark while the surviving hogs held their memory, and the "
                     "pool went back down)")
        by_pool = rate_by_pool(runs)
        if by_pool:
            line += ("; range reads in the pressure window by the pool size in effect: "
                     + ", ".join(f"{size} MiB {q:,.0f}/s ({n} s)" for size, (q, n) in sorted(by_pool.items()))
                     + f" (median queries/s, all runs; baseline at the configured size "
                     f"{spread(r.get('baseline_tps') for r in runs).median:,.0f}/s)")
        if late:
            usage = fmt_spread(u for _, u in late)
            line += (f"; {len(late)} shrink(s) over {len(runs)} run(s) came after the benchmark had ended the hogs, "
                     f"at {usage} MiB of cgroup usage (warn mark: 800 MiB), at level "
                     f"{'/'.join(sorted({str(lv) for lv, _ in late}))}: the level entered before was still held "
                     "(hysteresis, min_dwell), and a cache step is taken at a held level, where a kill is not")
        out.append(line)
    return out


def observations(data: dict) -> list[str]:
    """Facts computed from the runs that the tables do not show at a glance."""
    groups = group(data.get("runs", []))
    out = []
    for s in PRESSURE_SCENARIOS:
        runs = ok_runs(groups.get((s, "dbguard-bpf"), []))
        if runs:
            ends = [guard_ends(r.get("guard_actions", [])) for r in runs]
            bpf, user = sum(e[1] for e in ends), sum(e[0] for e in ends)
            critical = sum(1 for r in runs if any(a.get("level") == "critical" for a in r.get("guard_actions", [])))
            out.append(f"{s}, dbguard-bpf: {bpf} in-kernel (BPF) kill(s) and {user} user-space kill(s) over "
                       f"{len(runs)} run(s); the level reached critical (the BPF program's minimum to kill, "
                       f"[bpf] min_level_to_kill = 3) in {critical} of them")
        early = []
        for c in ("dbguard-user", "dbguard-bpf"):
            for r in ok_runs(groups.get((s, c), [])):
                early += [a for a in r.get("guard_actions", []) if a.get("t", 0) < 0
                          and a.get("action") == "shrink_cache"]
        if early:
            out.append(f"{s}: dbguard shrank the database's caches {len(early)} time(s) before any load started "
                       "(the cgroup is full of page cache from the data set load; the shrink is undone once "
                       "the level returns to ok)")
        if s == "moderate-hogs-mariadb":
            out += pool_moves(groups, s)
    return out


def summary(data: dict) -> str:
    groups = group(data.get("runs", []))
    parts = []
    rows = []
    for s in PRESSURE_SCENARIOS:
        for row in pressure_rows(groups, s, full=False):
            rows.append([s] + row)
    if rows:
        parts.append(markdown_table(["scenario"] + PRESSURE_HEADER_SHORT, rows))
    if any(s == "fork-storm" for s, _ in groups):
        parts.append(markdown_table(FORK_HEADER, fork_rows(groups)))
    cost = cost_rows(data)
    if cost:
        parts.append(markdown_table(COST_HEADER, cost))
    return "\n\n".join(parts)


def scale_compare(before: dict, now: dict) -> str:
    """The curve before and now, by the extra processes both measured."""
    old = {c["extra"]: c for c in before.get("curve", [])}
    rows = []
    for c in now.get("curve", []):
        b = old.get(c["extra"])
        if b is None:
            continue
        rows.append([f"+{c['extra']:,}", f"{b['processes']:,} / {c['processes']:,}",
                     f"{b['rest_cpu_ms']:.1f} → {c['rest_cpu_ms']:.1f}",
                     f"{b['pressed_cpu_ms']:.0f} → {c['pressed_cpu_ms']:.0f}",
                     f"{b['pressed_wall_ms']:.0f} → {c['pressed_wall_ms']:.0f}",
                     f"{b['full_cpu_ms']:.0f} → {c['full_cpu_ms']:.0f}"])
    return markdown_table(["extra processes", "processes seen (before / now)", "at rest, CPU ms",
                           "under pressure, CPU ms", "under pressure, wall ms",
                           "full read of /proc, CPU ms (the yardstick)"], rows)


def scale_table(sc: dict) -> str:
    rows = []
    for r in sc.get("rows", []):
        rows.append([r["case"], r["processes"], f"{r['wall_ms']['median']:.0f} ms ({r['wall_ms']['lo']:.0f}-{r['wall_ms']['hi']:.0f})",
                     f"{r['cpu_ms']['median']:.0f} ms", r.get("detail", "")])
    return markdown_table(["case", "processes seen", "one cycle, wall (median, range)", "CPU", "what the cycle did"], rows)
