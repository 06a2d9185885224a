"""benchmarks/RESULTS.md (and the timeline PNGs) from the raw results dict."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .stats import count_true, fmt_spread, markdown_table, ms, spread

ORDER = ("none", "pg-documented", "mariadb-documented", "earlyoom", "dbguard-user", "dbguard-bpf")
PRESSURE_SCENARIOS = ("moderate-hogs", "moderate-hogs-mariadb", "fast-hog", "runaway")
TITLES = {
    "moderate-hogs": "1. Many moderate hogs (PostgreSQL + six 150 MB hogs, 1000 MB cgroup)",
    "moderate-hogs-mariadb": "1b. Many moderate hogs next to MariaDB (512 MiB buffer pool kept full by range reads, "
                             "six 150 MB hogs, 1000 MB cgroup)",
    "fast-hog": "2. One fast hog (one process allocating 3000 MB in 64 MB steps without pause, 1000 MB cgroup)",
    "runaway": "3. Runaway query (work_mem=2GB sort at ~30 MB/s, 500 MB cgroup, pgbench -S -c 4 beside it)",
    "fork-storm": "4. Fork storm (the postmaster forks a backend per connection; 300 opened at once)",
}


def _group(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    g: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        g[(r["scenario"], r["contender"])].append(r)
    return g


def _contenders(groups, scenario: str) -> list[str]:
    present = {c for (s, c) in groups if s == scenario}
    return [c for c in ORDER if c in present] + sorted(present - set(ORDER))


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if not r.get("error")]


def _survived(runs: list[dict]) -> str:
    yes, n = count_true(r.get("db_survived") for r in runs)
    return f"{yes}/{n}" if n else "–"


def _killed(runs: list[dict], scenario: str) -> str:
    """What ended, as median counts: hogs (or the runaway) vs database processes."""
    if scenario == "runaway":
        outcomes = defaultdict(int)
        for r in runs:
            outcomes[r.get("runaway_outcome", "?")] += 1
        txt = ", ".join(f"{k} ×{v}" if len(runs) > 1 else k for k, v in outcomes.items())
    else:
        txt = f"hogs {fmt_spread(r.get('hogs_killed') for r in runs)} of {runs[0].get('hogs', '?')}"
    db = fmt_spread(r.get("db_processes_killed") for r in runs)
    return f"{txt}; database processes {db}"


def guard_ends(actions: list[dict]) -> tuple[int, int, int]:
    """(user-space kills, in-kernel BPF kills, queries/sessions ended by SQL) the guard carried out."""
    def done(a: dict) -> bool:
        return not str(a.get("result") or "").lower().startswith(("refused", "dry_run", "failed", "would", "skipped"))
    user = sum(1 for a in actions if a.get("action") == "kill" and a.get("path") != "bpf" and done(a))
    bpf = sum(1 for a in actions if a.get("action") == "kill" and a.get("path") == "bpf" and done(a))
    sql = sum(1 for a in actions if a.get("action") in ("cancel_query", "terminate_session") and done(a))
    return user, bpf, sql


def _ends(runs: list[dict]) -> str:
    if not any(r.get("guard_actions") for r in runs):
        return "–"
    per = [guard_ends(r.get("guard_actions", [])) for r in runs]
    return " / ".join(fmt_spread(x[i] for x in per) for i in range(3))


def _pressure_rows(groups, scenario: str, *, full: bool) -> list[list[str]]:
    rows = []
    for c in _contenders(groups, scenario):
        all_runs = groups[(scenario, c)]
        runs = _ok(all_runs)
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


PRESSURE_HEADER_SHORT = ["contender", "database survived", "crash recoveries", "sessions lost",
                         "throughput vs baseline", "limit → first kill", "what was ended"]
PRESSURE_HEADER_FULL = ["contender", "database survived", "crash recoveries", "sessions lost", "failed transactions",
                        "throughput vs baseline", "limit → first kill", "what was ended", "kernel OOM kills",
                        "guard kills user / BPF / SQL ends", "runs"]


def _fork_rows(groups) -> list[list[str]]:
    rows = []
    base = spread(r.get("connections_per_s") for r in _ok(groups.get(("fork-storm", "none"), [])))
    for c in _contenders(groups, "fork-storm"):
        runs = _ok(groups[("fork-storm", c)])
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
    for c in _contenders(groups, scenario):
        runs = _ok(groups[(scenario, c)])
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


def _cost_rows(data: dict) -> list[list[str]]:
    rows = []
    groups = _group(data.get("runs", []))
    # CPU under pressure from the scenarios measured in the same invocation (same machine) as the
    # cost extra, when results.json merges several.
    prov = data.get("provenance") or {}
    when = prov.get("cost", {}).get("date")
    scens = [s for s in PRESSURE_SCENARIOS if when is None or prov.get(s, {}).get("date") in (None, when)]
    for c in ("dbguard-user", "dbguard-bpf"):
        runs = [r for s in scens for r in _ok(groups.get((s, c), []))]
        cost = data.get("cost", {}).get(c, {})
        if not runs and not cost:
            continue
        rows.append([
            c,
            fmt_spread((r.get("cpu_idle_pct") for r in cost.get("runs", [])), "{:.1f}", " %")
            if cost else fmt_spread((r.get("guard_cpu_idle_pct") for r in runs), "{:.1f}", " %"),
            fmt_spread((r.get("guard_cpu_pressure_pct") for r in runs), "{:.1f}", " %"),
            fmt_spread((r.get("rss_steady_mib") for r in cost.get("runs", [])), "{:.0f}", " MiB"),
            fmt_spread((r.get("rss_peak_mib") for r in cost.get("runs", [])), "{:.0f}", " MiB"),
            fmt_spread((ms(r.get("startup_s")) for r in cost.get("runs", [])), "{:.0f}", " ms"),
        ])
    return rows


COST_HEADER = ["dbguard", "CPU idle (1 core = 100 %)", "CPU under pressure", "RSS steady",
               "RSS peak (VmHWM; BCC compile)", "startup to \"protecting\""]


def _notes(groups, scenario: str) -> list[str]:
    out = []
    for c in _contenders(groups, scenario):
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
        runs = _ok(groups.get((scenario, c), []))
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
    groups = _group(data.get("runs", []))
    out = []
    for s in PRESSURE_SCENARIOS:
        runs = _ok(groups.get((s, "dbguard-bpf"), []))
        if runs:
            ends = [guard_ends(r.get("guard_actions", [])) for r in runs]
            bpf, user = sum(e[1] for e in ends), sum(e[0] for e in ends)
            critical = sum(1 for r in runs if any(a.get("level") == "critical" for a in r.get("guard_actions", [])))
            out.append(f"{s}, dbguard-bpf: {bpf} in-kernel (BPF) kill(s) and {user} user-space kill(s) over "
                       f"{len(runs)} run(s); the level reached critical (the BPF program's minimum to kill, "
                       f"[bpf] min_level_to_kill = 3) in {critical} of them")
        early = []
        for c in ("dbguard-user", "dbguard-bpf"):
            for r in _ok(groups.get((s, c), [])):
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
    groups = _group(data.get("runs", []))
    parts = []
    rows = []
    for s in PRESSURE_SCENARIOS:
        for row in _pressure_rows(groups, s, full=False):
            rows.append([s] + row)
    if rows:
        parts.append(markdown_table(["scenario"] + PRESSURE_HEADER_SHORT, rows))
    if any(s == "fork-storm" for s, _ in groups):
        parts.append(markdown_table(FORK_HEADER, _fork_rows(groups)))
    cost = _cost_rows(data)
    if cost:
        parts.append(markdown_table(COST_HEADER, cost))
    return "\n\n".join(parts)


def _scale_section(sc: dict) -> str:
    rows = []
    for r in sc.get("rows", []):
        rows.append([r["case"], r["processes"], f"{r['wall_ms']['median']:.0f} ms ({r['wall_ms']['lo']:.0f}-{r['wall_ms']['hi']:.0f})",
                     f"{r['cpu_ms']['median']:.0f} ms", r.get("detail", "")])
    return markdown_table(["case", "processes seen", "one cycle, wall (median, range)", "CPU", "what the cycle did"], rows)


def machine_text(m: dict) -> str:
    return (f"Linux {m.get('kernel', '?')}, {m.get('cores', '?')} cores ({m.get('cpu', '?')}), "
            f"{m.get('memory', '?')} RAM, swap {m.get('swap', '?')}; {m.get('postgresql', '?')}; "
            + (f"{m['mariadb']}; " if m.get("mariadb") else "") + f"{m.get('earlyoom', '?')}")


def machine_of(data: dict, name: str) -> dict:
    """The machine a scenario (or extra) was measured on."""
    return (data.get("provenance") or {}).get(name, {}).get("machine") or data.get("machine", {})


def _provenance_lines(data: dict) -> list[str]:
    """When, how and where each scenario was measured: the date, command and machine lines for
    a single run of the harness; one entry per invocation when results.json merges several
    (--merge), each with its machine when they differ."""
    def cmd(c: str) -> str:
        return f"`{c}`" + (" (what `make bench` runs)" if c.strip() == "python -m benchmarks.run" else "")

    def load(m: dict) -> str:
        return f"load average at start {' '.join(m.get('loadavg_start') or ['?'])}"
    prov = data.get("provenance") or {}
    by_call: dict[tuple, list[str]] = defaultdict(list)
    for name, p in prov.items():
        by_call[(p.get("date"), p.get("git"), p.get("command"))].append(name)
    if len(by_call) <= 1:
        m = data.get("machine", {})
        return [f"- Date: {data.get('date', '?')}; git {data.get('git', '?')}; took {data.get('seconds', '?')} s",
                f"- Command (as root): {cmd(data.get('command', 'python -m benchmarks.run'))}",
                f"- Machine: {machine_text(m)}; {load(m)} (a VM shared with other engineers' test runs)"]
    machines = {machine_text(p.get("machine", {})) for p in prov.values()}
    out = ["- Measured in several invocations (results.json merges them with `--merge`), as root:"]
    for (date, git, command), names in sorted(by_call.items(), key=lambda kv: kv[0][0] or ""):
        first = prov[names[0]]
        secs = [prov[n].get("seconds") for n in names]
        took = (f"; took {secs[0]} s" + (" in all" if len(names) > 1 else "") if len(set(secs)) == 1 and secs[0] else
                "; took " + ", ".join(f"{n} {prov[n]['seconds']} s" for n in names if prov[n].get("seconds")))
        m = first.get("machine", {})
        out.append(f"  - {', '.join(names)}: {date}, git {git}, {cmd(command)}{took}; "
                   + (f"machine: {machine_text(m)}; " if len(machines) > 1 else "") + load(m))
    if len(machines) == 1:
        out.append(f"- Machine: {machines.pop()} (a VM shared with other engineers' test runs)")
    else:
        out.append("- Machines: the VM behind this box changed between the invocations (see each above): compare "
                   "figures across scenarios with that in mind; within one scenario all contenders ran on the "
                   "same machine, interleaved.")
    return out


def write(data: dict, path: Path, plot_dir: Path) -> None:
    from . import plot
    images = plot.write_all(data, plot_dir)
    groups = _group(data.get("runs", []))
    o = data.get("options", {})
    lines = [
        "# Benchmarks: dbguard against the kernel default, the databases' documented setups and earlyoom",
        "",
        *_provenance_lines(data),
        f"- Runs: {o.get('repeats', '?')} per contender and scenario"
        + (" (--quick: shorter loads)" if o.get("quick") else "")
        + "; contenders interleaved (A B C A B C …); figures are median (min-max).",
        "- Raw figures: [results.json](results.json). The in-kernel programs' per-call cost: [bpf/RESULTS.md](bpf/RESULTS.md).",
        "",
        "## Summary",
        "",
        summary(data) or "(no runs)",
        "",
        "Throughput vs baseline: pgbench's transactions per second (MariaDB: range-read queries per "
        "second) over the pressure window (seconds with no progress line, e.g. after a crash, count as "
        "zero) divided by the same run's rate in the seconds before the load started. Limit → first "
        "kill: from the cgroup first hitting its limit (cgroup v1 usage event / failcnt) to the first "
        "process death (pidfd) or, in the runaway scenario, the runaway query ending by SQL. The "
        "PostgreSQL scenarios' cgroups hold their data set in page cache, so they sit at the limit "
        "before the load starts (as a database's cgroup does): the limit is reached within ~0.1 s of "
        "the load's start, and this figure is in effect the time from the load's start to the first "
        "kill. InnoDB reads its files with O_DIRECT, so the MariaDB cgroup holds little page cache: "
        "it reaches its limit only as the hogs grow (~1.5-2.5 s in).",
        "",
        *(["Observations from the runs:", ""] + [f"- {o}" for o in observations(data)] + [""]
          if observations(data) else []),
        "## Contenders",
        "",
    ]
    from .contenders import all_contenders
    for c in all_contenders().values():
        lines.append(f"- **{c.name}**: {c.what}")
    lines += [
        "",
        "What could not be applied here, as the runs reported it:",
        "",
        "- pg-documented: this host has no CAP_SYS_RESOURCE, so the kernel refuses to lower any "
        "oom_score_adj below 0. The postmaster stays at 0 like every other process; the children's "
        "reset to 0 (PG_OOM_ADJUST_FILE) is then a no-op. On this host it behaves as the kernel default, "
        "and it is measured anyway so that the table says so from a run, not from an assumption. "
        "`vm.overcommit_memory=2`, the docs' other advice, was not applied: it is host-wide (other "
        "users share this machine) and does not bound a memory cgroup anyway.",
        "- mariadb-documented: Debian's `mariadb.service` ships `OOMScoreAdjust=-600` commented out "
        "(\"Kernels like killing mariadbd when out of memory because its big. Lets temper that preference "
        "a little.\"); a DBA who follows it uncomments it. Writing -600 to mariadbd's oom_score_adj is "
        "refused here for the same reason as above (EACCES, no CAP_SYS_RESOURCE), so mariadbd stays at 0. "
        "What the unit does apply, `Restart=on-abnormal` with `RestartSec=5s`, is emulated: when mariadbd "
        "dies by a signal it is started again 5 s later on the same data directory in the same cgroup "
        "(lab.mariadb.MariaDB.respawn); the clients reconnect. The rest of the unit (ProtectSystem, "
        "LimitNOFILE, …) has no bearing on memory.",
        "- earlyoom: it reads MemAvailable and SwapFree of the whole host; a memory cgroup at its "
        "limit leaves the host's 24 GiB almost untouched, so it never reaches its 10 % threshold and "
        "never acts. Its own output (lowest MemAvailable seen) is in the per-scenario notes below.",
        "",
    ]
    for s in PRESSURE_SCENARIOS:
        if not any(k[0] == s for k in groups):
            continue
        lines += [f"## {TITLES[s]}", "", markdown_table(PRESSURE_HEADER_FULL, _pressure_rows(groups, s, full=True)), ""]
        if s == "moderate-hogs-mariadb":
            lines += [markdown_table(MARIADB_HEADER, mariadb_rows(groups, s)), "",
                      "MariaDB 10.11, `innodb_buffer_pool_size=512M`, 2,000,000 rows (id INT PRIMARY KEY, "
                      "pad CHAR(255): ~610 MiB of pages, more than the pool holds, so the pool is full); four "
                      "client processes outside the cgroup run `SELECT SUM(LENGTH(pad)) FROM w.t WHERE id "
                      "BETWEEN x AND x+99` from random x (lab.mariadb.ReadLoad), reconnecting every 0.2 s "
                      "when a connection is lost. Client errors: queries sent and not answered. Crash "
                      "recoveries: InnoDB's \"Starting crash recovery\" in the error log at a restart; it runs "
                      "only when the killed server still had redo past its last checkpoint (from loading the "
                      "table: the read load writes nothing), so a restarted server may or may not run one. The "
                      "limit: mariadbd holds ~610 MiB at baseline (cgroup usage when the hogs start, above), "
                      "so 1000 MB leaves it ~390 MB of room without pressure (under dbguard's 80 % warn mark), "
                      "and the six hogs' 900 MB overrun it by ~500 MB: without a guard the kernel must kill "
                      "(the none rows show it does). A limit → first kill of \"–\" means the cgroup never "
                      "reached its limit (the guard made room first); the hogs' start → first kill column "
                      "above times those runs. dbguard runs with its defaults for the database "
                      "(`buffer_pool_floor` 128 MiB, `shrink_steps` 3: 512 → 384 → 256 → 128 MiB), as in "
                      "scenario 1. After the load the benchmark ends the hogs still alive and waits up to "
                      "60 s for the pool to be back at its configured size (and a supervised server to be "
                      "up); the final size is read then, before dbguard stops (its SIGTERM puts the DBA's "
                      "size back).", ""]
        if s == "fast-hog" and machine_of(data, s).get("hog_alloc_gib_s"):
            lines += [f"The hog fills memory at {machine_of(data, s)['hog_alloc_gib_s']} GiB/s when no limit is near (measured "
                      "in the same run, on the shared machine). At the limit its page faults must first "
                      "reclaim the cgroup's page cache (the data set's), so usage sits at the limit for "
                      "seconds before the kernel's OOM kill (see results.json samples): the hog's "
                      "allocation is throttled by reclaim, not by its own speed.", ""]
        tps = []
        for c in _contenders(groups, s):
            runs = _ok(groups[(s, c)])
            if runs:
                tps.append([c, fmt_spread(r.get("baseline_tps") for r in runs),
                            fmt_spread(r.get("pressure_tps") for r in runs),
                            fmt_spread((r.get("limit_reached_at") for r in runs), "{:.2f}", " s")])
        unit = "queries/s" if s == "moderate-hogs-mariadb" else "tps"
        lines += [markdown_table(["contender", f"baseline {unit}", f"{unit} under pressure",
                                  "limit reached after load start"], tps), ""]
        notes = _notes(groups, s)
        if notes:
            lines += ["Notes from the runs:", ""] + notes + [""]
        if s in images:
            lines += [f"![{s} timeline]({images[s]})", "",
                      "One run per contender (the first round): cgroup memory use, host PSI memory "
                      "some avg10, " + ("range-read queries/s, the buffer pool's size; green dashed lines are "
                                         "restarts of mariadbd" if s == "moderate-hogs-mariadb" else "pgbench tps")
                      + "; red lines are kills or ended queries.", ""]
    if any(k[0] == "fork-storm" for k in groups):
        lines += [f"## {TITLES['fork-storm']}", "", markdown_table(FORK_HEADER, _fork_rows(groups)), "",
                  "Connections/s: `pgbench -C -S -c 4` (a new connection for every one-SELECT transaction) "
                  "for the storm's length; each connection is one fork and one exit of a postmaster child, "
                  "so the rate is bounded by backend start-up on 2 cores, and what a guard adds to a fork "
                  "shows as a lower rate. On this shared VM the rate moves by about ±10 % between "
                  "contenders that add nothing to a fork (earlyoom, pg-documented): read 'vs none' with "
                  "that in mind; the BPF fork hooks' own cost per call is measured directly in "
                  "[bpf/RESULTS.md](bpf/RESULTS.md). Protected at birth: of 300 "
                  "backends opened at once, how many the contender's mechanism covered right after the last "
                  "connect — for dbguard-bpf, entries with a protection flag in its BPF `procs` map (read "
                  "with bpftool), for the others an oom_score_adj lowered below 0 (the only protection they "
                  "have; refused on this host). dbguard's user-space path protects backends by classifying "
                  "them each cycle (never signalled; candidates' scores raised instead), which leaves no "
                  "per-process mark to count here.", ""]
        notes = _notes(groups, "fork-storm")
        if notes:
            lines += ["Notes from the runs:", ""] + notes + [""]
    if data.get("scale"):
        sc = data["scale"]
        lines += ["## Scale: one sidecar cycle", "", sc.get("method", ""), "", _scale_section(sc), ""]
        slow = [r for r in sc.get("rows", []) if r["wall_ms"]["median"] > 1000]
        for r in slow:
            lines += [f"With {r['processes']:,} processes one cycle takes {r['wall_ms']['median']:.0f} ms: longer "
                      "than the default 1 s interval (general.interval), so on such a host the loop runs "
                      "back to back and reacts a cycle later than on a small one.", ""]
    if data.get("cost"):
        prov = data.get("provenance") or {}
        apart = [s for s in PRESSURE_SCENARIOS if prov.get(s, {}).get("date") not in (None, prov.get("cost", {}).get("date"))]
        lines += ["## dbguard's own cost", "", data["cost"].get("method", "")
                  + (f" CPU under pressure leaves out {', '.join(apart)}, measured in another invocation on "
                     "another machine (its runs' guard_cpu_pressure_pct is in results.json)." if apart else ""), "",
                  markdown_table(COST_HEADER, _cost_rows(data)), ""]
    lines += ["## Reproduce", "", "```", "sudo make bench                                   # = python -m benchmarks.run",
              "sudo .venv/bin/python -m benchmarks.run --help", "sudo .venv/bin/python -m benchmarks.run --quick",
              "# one scenario only, the others' results kept (here: MariaDB's)",
              "sudo .venv/bin/python -m benchmarks.run --scenarios moderate-hogs-mariadb --extras '' --merge",
              "sudo .venv/bin/python -m benchmarks.bpf.run --write   # BPF per-call cost", "```", ""]
    path.write_text("\n".join(lines))
