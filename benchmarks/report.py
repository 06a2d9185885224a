"""benchmarks/RESULTS.md (and the timeline PNGs) from the raw results dict.

    .venv/bin/python -m benchmarks.report        # render again from results.json, no benchmark run

Facts about the host (capabilities, memory, cores, cgroup version, VM) come from what
benchmarks.machine recorded in results.json at run time, never from this file: a fact a run
did not record is left unsaid, or said from the runs' own notes where they tell it.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from . import cancel_again, cancel_latency, giveback, release_race, rss, scenario_cache, table_memory, vm_oomd
from . import pace as loop_pace
from .files import RESULTS_JSON, RESULTS_MD
from .machine import has_capability, machine_of, machine_text, memory_gib
from .stats import fmt_spread, markdown_table
from .reclaim_latency import TIMED_ALIKE, percentile
from .tables import (COST_HEADER, FASTHOGS_HEADER, FORK_HEADER, MARIADB_HEADER, PRESSURE_HEADER_FULL,
                     PRESSURE_SCENARIOS, contenders_in, cost_before_attach, cost_rows, fasthogs_rows, fork_rows, group, mariadb_rows,
                     observations, ok_runs, pressure_rows, run_notes, scale_compare, scale_table, summary)

TITLES = {
    "moderate-hogs": "1. Many moderate hogs (PostgreSQL + six 150 MB hogs, 1000 MB cgroup)",
    "parent-limit": "1c. The limit on a parent cgroup (the moderate hogs, 1000 MB on the parent; PostgreSQL and the "
                    "hogs in unlimited sibling cgroups; no [pressure] cgroup for dbguard)",
    "moderate-hogs-mariadb": "1b. Many moderate hogs next to MariaDB (512 MiB buffer pool kept full by range reads, "
                             "six 150 MB hogs, 1000 MB cgroup)",
    "fast-hog": "2. One fast hog (one process allocating 3000 MB in 64 MB steps without pause, 1000 MB cgroup)",
    "fast-hogs": "2b. Fast hogs, issue #19 (PostgreSQL shared_buffers 400MB and pgbench -S -c 4, 900 MB cgroup; "
                 "round after round, six 110 MB hogs started together, each allocating as fast as it can)",
    "runaway": "3. Runaway query (work_mem=2GB sort at ~30 MB/s, 500 MB cgroup, pgbench -S -c 4 beside it)",
    "fork-storm": "4. Fork storm (the postmaster forks a backend per connection; 300 opened at once)",
    "sessions": "5. The database as its own hog (12 PostgreSQL sessions sorting with work_mem=96MB, "
                "shared_buffers=200MB, pgbench -S -c 2, 900 MB cgroup, no outside process)",
    "sessions-mariadb": "5b. The same with MariaDB (16 sessions over 400,000 wide rows: 8 sorts with "
                        "sort_buffer_size=160M, merge runs to tmpdir, 8 in-memory temporary tables up to 256M; "
                        "2 range-read clients, 900 MB cgroup)",
}


def procfs_reference_lines(cost: dict, when: str) -> list[str]:
    """The machine's /proc read speed a cost run recorded (benchmarks.cost.procfs_reference)."""
    ref = cost.get("procfs_reference")
    if not ref:
        return []
    return [f"{when}, dbguard read one process's /proc in full in {ref['us_per_process']:.0f} µs (`benchmarks/cost.py` "
            f"procfs_reference: sense.procfs.read_procs over the host's {ref['processes']} processes, median of 5). "
            "The CPU at rest is mostly such reads (the sweep, the largest each cycle): where they are slower, the "
            "same code shows more CPU.", ""]


def _recorded(prov: dict) -> str:
    """Where an earlier record came from, in one line."""
    load = " ".join((prov.get("machine") or {}).get("loadavg_start") or []) or "?"
    return f"git {prov.get('git', '?')}, {prov.get('date', '?')}, `{prov.get('command', '?')}`, load average at start {load}"


def _latency_rows(groups: dict, s: str, key: str = "reclaim_to_kill",
                  paths: tuple[str, ...] = ("unseen", "kernel", "bpf"), tracer: tuple[str, ...] | None = None) -> list[list[str]]:
    """Per contender and path: events, median, p99 (nearest rank), events with no failing reclaim;
    with `tracer`, only runs recorded by those tracer versions, and the median of the first kill of
    each failing episode as well."""
    import statistics
    rows = []
    for c in contenders_in(groups, s):
        runs = [r for r in ok_runs(groups[(s, c)]) if tracer is None or r.get("tracer") in tracer]
        for path in paths:
            ms = sorted(x for r in runs for x in (r.get(f"{key}_ms") or {}).get(path, []))
            none = sum((r.get(key) or {}).get(path, {}).get("without_failing_reclaim", 0) for r in runs)
            if ms or none:
                row = [c, path, str(len(ms) + none), f"{statistics.median(ms):.3f} ms" if ms else "–",
                       f"{percentile(ms, 0.99):.3f} ms" if ms else "–"]
                if tracer is not None:
                    first = [x for r in runs for x in (r.get(f"{key.replace('kill', 'first_kill')}_ms") or {}).get(path, [])]
                    row += [str(len(first)), f"{statistics.median(first):.3f} ms" if first else "–"]
                rows.append(row + [str(none)])
    return rows


def _kernel_count_check(groups: dict, s: str) -> list[str]:
    """Where the tracer's kernel kills and the cgroups' own oom_kill counters disagree, say so
    (tracer v2 took a BPF kill that the OOM killer marked afterwards for the kernel's)."""
    out = []
    for c in contenders_in(groups, s):
        for version in TIMED_ALIKE:
            runs = [r for r in ok_runs(groups[(s, c)]) if r.get("tracer") == version]
            traced = sum((r.get("reclaim_to_kill") or {}).get("kernel", {}).get("kills", 0) for r in runs)
            counted = sum(r.get("kernel_oom_kills", 0) for r in runs)
            if runs and traced != counted:
                out.append(f"- {c} (tracer {version}, {len(runs)} runs): the tracer's kernel path has {traced} kills, "
                           f"the cgroup's oom_kill counter {counted}"
                           + (": the difference are kills the tracer v2 took for the OOM killer's: BPF kills of tasks "
                              "that the OOM killer then marked as its victim without a kill of its own (its "
                              "task_will_free_mem path; the cgroup counted none); they belong in the bpf row" if version == "v2" and traced > counted else ""))
    return ["Checked against the kernel's own count:", "", *out, ""] if out else []


def _repeats_text(groups: dict, options: dict) -> str:
    """How many runs each scenario has (merged records may differ by scenario: see the runs column)."""
    per: dict[int, list[str]] = defaultdict(list)
    for s in dict.fromkeys(k[0] for k in groups):
        per[max(len(groups[k]) for k in groups if k[0] == s)].append(s)
    if len(per) <= 1:
        return str(next(iter(per), options.get("repeats", "?")))
    return "; ".join(f"{n} in {', '.join(ss)}" for n, ss in sorted(per.items(), reverse=True))


def _session_end_lines(groups: dict, s: str) -> list[str]:
    """The sessions scenarios: the cgroup reaching its limit → the guard's first session end, by
    path (its audit), and for PostgreSQL the tracer's failing reclaim → SIGINT delivered."""
    rows = []
    for c in contenders_in(groups, s):
        runs = ok_runs(groups[(s, c)])
        for path in ("user", "bpf"):
            xs = [(r.get("limit_to_first_end_s") or {}).get(path) for r in runs]
            if any(x is not None for x in xs):
                rows.append([c, path, f"{sum(x is not None for x in xs)} of {len(runs)}",
                             fmt_spread((x * 1000 for x in xs if x is not None), "{:.0f}", " ms")])
    out = []
    if rows:
        out += [markdown_table(["contender", "path", "runs with an end on it", "limit reached → first session end"],
                               rows), "",
                "From the guard's audit (the record's time, after the end was carried out) and the cgroup's own "
                "failcnt / usage event (lab.watch.Watcher); negative: the guard ended a session before the cgroup "
                "reached its limit. user: pg_cancel_backend / pg_terminate_backend, KILL QUERY / KILL CONNECTION; "
                "bpf: SIGINT from the kernel ([bpf] cancel).", ""]
    lat = _latency_rows(groups, s, "reclaim_to_cancel", ("user", "bpf", "unseen"))
    if lat:
        out += [markdown_table(["contender", "path", "SIGINTs", "first failing reclaim → SIGINT delivered, median",
                                "p99", "SIGINTs without a failing reclaim"], lat), "",
                "Measured by benchmarks/reclaim_latency.py's tracer (Tracer(sig=2)), not by dbguard: every SIGINT "
                "sent to a sorting backend, by who sent it: user = a process (pg_cancel_backend), bpf = SI_KERNEL "
                "(dbguard's in-kernel cancel). The run recorded on 2026-12-01 14:13 used the tracer as it was then "
                "(git e578a6b: timed to the SIGINT's delivery from the backend's own failing streak; a kernel cancel "
                "would have shown as unseen); every SIGINT it saw came from user space before any failing reclaim "
                "of its backend, which both tracers count the same way.", ""]
    return out


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
                f"- Machine: {machine_text(m)}; {load(m)}"]
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
        out.append(f"- Machine: {machines.pop()}")
    else:
        out.append("- Machines: the machine behind this box changed between the invocations (see each above): compare "
                   "figures across scenarios with that in mind; within one scenario all contenders ran on the "
                   "same machine, interleaved.")
    return out


# --- host facts, from what the runs recorded ---------------------------------------------------

def _runs_of(groups, contender: str, scenarios=None) -> list[dict]:
    return [r for (s, c), rs in groups.items() if c == contender and (scenarios is None or s in scenarios)
            for r in ok_runs(rs)]


def lacked_cap_sys_resource(data: dict, groups, contender: str, scenarios=None) -> tuple[bool | None, str]:
    """Whether the benchmark lacked CAP_SYS_RESOURCE where `contender` ran, and on what evidence:
    the capabilities machine() recorded, else the runs' own notes (EACCES on every score write
    they tried; a note written at run time says why). None: neither tells."""
    scens = {s for (s, c) in groups if c == contender and (scenarios is None or s in scenarios)}
    caps = {has_capability(machine_of(data, s), "CAP_SYS_RESOURCE") for s in scens}
    if len(caps) == 1 and None not in caps:
        have = caps.pop()
        return (not have), f"the benchmark ran {'with' if have else 'without'} CAP_SYS_RESOURCE (results.json: machine)"
    runs = _runs_of(groups, contender, scenarios)
    refused = [r for r in runs if any("NOT applied: EACCES" in n for n in r.get("notes", []))]
    if runs and len(refused) == len(runs):
        return True, (f"the benchmark had no CAP_SYS_RESOURCE (the kernel refused the write with EACCES in "
                      f"{len(refused)} of {len(runs)} runs, as their notes below say)")
    return None, ""


def _applicability(data: dict, groups) -> list[str]:
    """What could not be applied, per contender, as the runs recorded it."""
    out = []
    if _runs_of(groups, "pg-documented"):
        lacked, basis = lacked_cap_sys_resource(data, groups, "pg-documented")
        if lacked:
            text = (f"{basis}, so the kernel refuses to lower any oom_score_adj below 0. The postmaster stays at 0 "
                    "like every other process; the children's reset to 0 (PG_OOM_ADJUST_FILE) is then a no-op. "
                    "Here it behaves as the kernel default, and it is measured anyway so that the table says so "
                    "from a run, not from an assumption.")
        elif lacked is False:
            text = f"{basis}, so the kernel lets it lower the postmaster's oom_score_adj (see the notes below)."
        else:
            text = "whether the kernel let it lower the postmaster's oom_score_adj is in the notes below."
        out.append(f"- pg-documented: {text} `vm.overcommit_memory=2`, the docs' other advice, was not applied: "
                   "it is host-wide (it would govern every process on the machine, not the database alone) and "
                   "does not bound a memory cgroup anyway.")
    if _runs_of(groups, "mariadb-documented"):
        lacked, basis = lacked_cap_sys_resource(data, groups, "mariadb-documented")
        score = ("Writing -600 to mariadbd's oom_score_adj was refused in these runs (EACCES, no CAP_SYS_RESOURCE), "
                 "so mariadbd stays at 0." if lacked else
                 f"Writing -600 to mariadbd's oom_score_adj is allowed: {basis}." if lacked is False else
                 "Whether writing -600 to mariadbd's oom_score_adj was allowed is in the notes below.")
        out.append("- mariadb-documented: Debian's `mariadb.service` ships `OOMScoreAdjust=-600` commented out "
                   "(\"Kernels like killing mariadbd when out of memory because its big. Lets temper that preference "
                   f"a little.\"); a DBA who follows it uncomments it. {score} "
                   "What the unit does apply, `Restart=on-abnormal` with `RestartSec=5s`, is emulated: when mariadbd "
                   "dies by a signal it is started again 5 s later on the same data directory in the same cgroup "
                   "(lab.mariadb.MariaDB.respawn); the clients reconnect. The rest of the unit (ProtectSystem, "
                   "LimitNOFILE, …) has no bearing on memory.")
    runs = _runs_of(groups, "earlyoom")
    if runs:
        kills = [int(m.group(1)) for r in runs for n in r.get("notes", [])
                 if (m := re.match(r"earlyoom .*?: (\d+) kill\(s\)", n))]
        mems = {memory_gib(machine_of(data, s)) for (s, c) in groups if c == "earlyoom"}
        mem = f"the host's {mems.pop()}" if len(mems) == 1 and None not in mems else "the host's memory"
        if len(kills) == len(runs) and not any(kills):
            acted = "so it never reaches its 10 % threshold and never acts"
        elif len(kills) == len(runs):
            acted = (f"yet it acted: {sum(kills)} kill(s) in {sum(1 for k in kills if k)} of {len(runs)} runs "
                     "(its 10 % threshold was reached)")
        else:
            acted = "so it acts only below its 10 % threshold of the whole host"
        out.append(f"- earlyoom: it reads MemAvailable and SwapFree of the whole host; a memory cgroup at its "
                   f"limit leaves {mem} almost untouched, {acted}. Its own output (lowest MemAvailable seen) is "
                   "in the per-scenario notes below.")
    return out


def _limit_timing(data: dict, groups) -> str:
    """How the cgroups reached their limit, from the runs: when (seconds after the load
    started) and how the Watcher saw it (the cgroup version's counter)."""
    def reached(scens) -> list[float]:
        return [r["limit_reached_at"] for (s, c), rs in groups.items() if s in scens
                for r in ok_runs(rs) if r.get("limit_reached_at") is not None]
    versions = {machine_of(data, s).get("memory_cgroup") for (s, _) in groups if s in PRESSURE_SCENARIOS}
    how = {1: "cgroup v1 usage event / failcnt", 2: "memory.events max"}.get(versions.pop()) \
        if len(versions) == 1 else None
    text = ("Limit → first kill: from the cgroup first hitting its limit ("
            + (how or "its limit counter: failcnt on cgroup v1, memory.events max on v2")
            + ") to the first process death (pidfd) or, in the runaway scenario, the runaway query ending by SQL.")
    pg = [(s, max(t)) for s in ("moderate-hogs", "fast-hog", "runaway") if (t := reached((s,)))]
    if pg:
        text += (" The PostgreSQL scenarios' cgroups hold their data set in page cache, so they sit at the limit "
                 "before the load starts (as a database's cgroup does): the limit is reached at most "
                 + ", ".join(f"{t:.2f} s ({s})" for s, t in pg) + " after the load's start, and this figure is "
                 "in effect the time from the load's start to the first kill.")
    my = reached(("moderate-hogs-mariadb",))
    if my:
        text += (" InnoDB reads its files with O_DIRECT, so the MariaDB cgroup holds little page cache: it reaches "
                 f"its limit only as the hogs grow (~{min(my):.1f}-{max(my):.1f} s in).")
    return text


def _fork_text(data: dict, groups) -> str:
    cores = machine_of(data, "fork-storm").get("cores")
    base = [r["connections_per_s"] for r in ok_runs(groups.get(("fork-storm", "none"), []))
            if r.get("connections_per_s")]
    inert = [r["connections_per_s"] for c in ("none", "earlyoom", "pg-documented")
             for r in ok_runs(groups.get(("fork-storm", c), [])) if r.get("connections_per_s")]
    lacked, _ = lacked_cap_sys_resource(data, groups, "pg-documented", ("fork-storm",))
    move = ""
    if base and inert:
        mid = statistics.median(base)
        move = (f" Here the rate moved by up to ±{max(abs(x / mid - 1) for x in inert) * 100:.0f} % from none's "
                "median across the runs of contenders that add nothing to a fork (none, earlyoom, pg-documented): "
                "read 'vs none' with that in mind;")
    return ("Connections/s: `pgbench -C -S -c 4` (a new connection for every one-SELECT transaction) "
            "for the storm's length; each connection is one fork and one exit of a postmaster child, "
            f"so the rate is bounded by backend start-up on {f'{cores} cores' if cores else 'the machine'}, and "
            f"what a guard adds to a fork shows as a lower rate.{move} "
            + ("the" if move else "The") + " BPF fork hooks' own cost per call is measured directly in "
            "[bpf/RESULTS.md](bpf/RESULTS.md). Protected at birth: of 300 "
            "backends opened at once, how many the contender's mechanism covered right after the last "
            "connect — for dbguard-bpf, entries with a protection flag in its BPF `procs` map (read "
            "with bpftool), for the others an oom_score_adj lowered below 0 (the only protection they "
            "have" + ("; refused here: no CAP_SYS_RESOURCE" if lacked else "") + "). dbguard's user-space path "
            "protects backends by classifying them each cycle (never signalled; candidates' scores raised "
            "instead), which leaves no per-process mark to count here.")


def write(data: dict, path: Path, plot_dir: Path) -> None:
    from . import plot
    images = plot.write_all(data, plot_dir)
    groups = group(data.get("runs", []))
    o = data.get("options", {})
    lines = [
        "# Benchmarks: dbguard against the kernel default, the databases' documented setups and earlyoom",
        "",
        *_provenance_lines(data),
        f"- Runs per contender and scenario: {_repeats_text(groups, o)}"
        + (" (--quick: shorter loads)" if o.get("quick") else "")
        + "; contenders interleaved (A B C A B C …); figures are median (min-max).",
        "- Raw figures: [results.json](results.json). The in-kernel programs' per-call cost: [bpf/RESULTS.md](bpf/RESULTS.md).",
        "- PostgreSQL crash recoveries are counted once per crash (the postmaster's line for the crash's first "
        "process, \"... was terminated by signal\") in records made from 2026-12-03 06:10 UTC on; records made before counted "
        "the server log's crash lines, two per crash the server restarted from (the killed process's line and "
        "\"reinitializing\"): there, crash recoveries are twice the crashes.",
        "",
        "## Summary",
        "",
        summary(data) or "(no runs)",
        "",
        "Throughput vs baseline: pgbench's transactions per second (MariaDB: range-read queries per "
        "second) over the pressure window (seconds with no progress line, e.g. after a crash, count as "
        "zero) divided by the same run's rate in the seconds before the load started. "
        + _limit_timing(data, groups),
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
        *_applicability(data, groups),
        "",
    ]
    for s in PRESSURE_SCENARIOS:
        if not any(k[0] == s for k in groups):
            continue
        if s == "fast-hogs":
            lines += [f"## {TITLES[s]}", "", markdown_table(FASTHOGS_HEADER, fasthogs_rows(groups, s)), ""]
        else:
            lines += [f"## {TITLES[s]}", "", markdown_table(PRESSURE_HEADER_FULL, pressure_rows(groups, s, full=True)), ""]
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
                      "in the same run). At the limit its page faults must first "
                      "reclaim the cgroup's page cache (the data set's), so usage sits at the limit for "
                      "seconds before the kernel's OOM kill (see results.json samples): the hog's "
                      "allocation is throttled by reclaim, not by its own speed.", ""]
        if s == "fast-hogs":
            lines += [markdown_table(["contender", "path", "kills", "first failing reclaim → SIGKILL sent, median",
                                      "p99", "first kills of an episode", "their median",
                                      "kills with no failing episode"],
                                     _latency_rows(groups, s, paths=("kernel", "user", "bpf"), tracer=TIMED_ALIKE)),
                      "", "Measured by benchmarks/reclaim_latency.py, a tracer of its own (not dbguard's programs; "
                      "validated against an outside oracle by tests/e2e/test_reclaim_latency.py): per SIGKILL, from "
                      "the beginning of the first reclaim that freed nothing in the failing episode of the target's "
                      "memory cgroup (from a moment when no task of it had a failing streak going: a streak ends "
                      "when a reclaim frees something, a page is mapped into the task's own process, or it makes its "
                      "next syscall) to the kill being sent (signal_generate, a raw tracepoint, so that kills sent "
                      "inside dbguard's BPF programs are seen). A later kill of the same episode is timed from its "
                      "start too: the first-kill columns show the first ones alone. Paths: kernel = the kernel's OOM "
                      "killer (its oom:mark_victim of the process it just signalled); user = a process's kill() or "
                      "pidfd_send_signal() (dbguard's user path; the harness's own SIGKILL of each round's "
                      "survivors is left out); bpf = an SI_KERNEL SIGKILL the OOM killer did not mark "
                      "(bpf_send_signal / bpf_send_signal_task). Only runs recorded with this tracer (results.json "
                      "\"tracer\": \"v2\" or \"v3\") are counted here; earlier runs timed otherwise. Rounds: one cluster and "
                      "data set per contender, hogs started together again once the last round's were killed "
                      "or held their memory; a round with a kernel OOM kill counts the cgroup's oom_kill "
                      "counter and the kernel log.", ""]
            lines += _kernel_count_check(groups, s)
        if s in ("sessions", "sessions-mariadb"):
            lines += _session_end_lines(groups, s)
        tps = []
        for c in contenders_in(groups, s) if s != "fast-hogs" else ():    # rounds, not a timed load
            runs = ok_runs(groups[(s, c)])
            if runs:
                tps.append([c, fmt_spread(r.get("baseline_tps") for r in runs),
                            fmt_spread(r.get("pressure_tps") for r in runs),
                            fmt_spread((r.get("limit_reached_at") for r in runs), "{:.2f}", " s")])
        unit = "queries/s" if s == "moderate-hogs-mariadb" else "tps"
        if tps:
            lines += [markdown_table(["contender", f"baseline {unit}", f"{unit} under pressure",
                                      "limit reached after load start"], tps), ""]
        notes = run_notes(groups, s)
        if notes:
            lines += ["Notes from the runs:", ""] + notes + [""]
        if s in images:
            lines += [f"![{s} timeline]({images[s]})", "",
                      "One run per contender (the first round): cgroup memory use, host PSI memory "
                      "some avg10, " + ("range-read queries/s, the buffer pool's size; green dashed lines are "
                                         "restarts of mariadbd" if s == "moderate-hogs-mariadb" else "pgbench tps")
                      + "; red lines are kills or ended queries.", ""]
    if any(k[0] == "fork-storm" for k in groups):
        lines += [f"## {TITLES['fork-storm']}", "", markdown_table(FORK_HEADER, fork_rows(groups)), "",
                  _fork_text(data, groups), ""]
        notes = run_notes(groups, "fork-storm")
        if notes:
            lines += ["Notes from the runs:", ""] + notes + [""]
    if data.get("scale"):
        sc = data["scale"]
        lines += ["## Scale: one sidecar cycle", "", sc.get("method", ""), "", scale_table(sc), ""]
        for e in (data.get("earlier") or {}).get("scale", [])[:1]:
            then, now = (e["provenance"].get("machine") or {}), machine_of(data, "scale")
            # The full read is the same work in both runs: where the machine changed, it says by
            # how much the machine alone moved the figures.
            moved = ("" if then.get("cpu") == now.get("cpu") else
                     f" The two runs were on different machines ({then.get('cpu', '?')} before, "
                     f"{now.get('cpu', '?')} now): the last column, the same full read in both, shows how "
                     "much of the difference is the machine's.")
            lines += [f"Before and now, CPU of one cycle (median ms); before: {_recorded(e['provenance'])}.{moved}", "",
                      scale_compare(e["data"], sc), ""]
        if "scale" in images:
            lines += [f"![processes vs cycle CPU]({images['scale']})", ""]
        # The daemon's own cycles against its paces: 1 s at rest (general.interval), 0.2 s
        # under pressure; the "full read (before)" rows are the old cost, shown for comparison.
        for r in sc.get("rows", []):
            pace = 200 if "under pressure" in r["case"] else 1000 if "at rest" in r["case"] else None
            if pace is not None and r["wall_ms"]["median"] > pace:
                lines += [f"{r['case']}: one cycle takes {r['wall_ms']['median']:.0f} ms with {r['processes']:,} "
                          f"processes, longer than its {pace} ms pace: on such a host the loop runs back to "
                          "back and reacts a cycle later than on a small one.", ""]
    lines += loop_pace.section() + table_memory.section()
    if data.get("cost"):
        prov = data.get("provenance") or {}
        apart = [s for s in PRESSURE_SCENARIOS if prov.get(s, {}).get("date") not in (None, prov.get("cost", {}).get("date"))]
        elsewhere = {machine_text(machine_of(data, s)) for s in apart} != {machine_text(machine_of(data, "cost"))}
        lines += ["## dbguard's own cost", "", data["cost"].get("method", "")
                  + (f" CPU under pressure leaves out {', '.join(apart)}, measured in another invocation"
                     + (" on another machine" if elsewhere else "")
                     + " (its runs' guard_cpu_pressure_pct is in results.json)." if apart else ""), "",
                  markdown_table(COST_HEADER, cost_rows(data)), ""]
        lines += procfs_reference_lines(data["cost"], "In this run")
        for e in (data.get("earlier") or {}).get("cost", [])[:1]:
            cpu = (e["provenance"].get("machine") or {}).get("cpu")
            apart = f" on another processor ({cpu}: its times are not comparable)" if cpu and cpu != machine_of(data, "cost").get("cpu") else ""
            how = ("by the same method but that \"protecting\" was written once the kernel path was attached "
                   "(the BPF rows' two columns are one time)" if cost_before_attach(e["data"]) else "by the same method")
            lines += [f"Before, {how}{apart}: {_recorded(e['provenance'])}:", "",
                      markdown_table(COST_HEADER, cost_rows({"cost": e["data"]})), ""]
            lines += procfs_reference_lines(e["data"], "In that run")
        lines += rss.made_of_lines(data["cost"])
        child = [c for c in data["cost"].get("compile_child", []) if not c.get("error")]
        if child:
            lines += ["The BPF compile's child (dbguard/kernel/loader.py, not in the rows above): peak RSS "
                      + fmt_spread((c["peak_mib"] for c in child), "{:.0f}", " MiB") + " for "
                      + fmt_spread((c["seconds"] * 1000 for c in child), "{:.0f}", " ms")
                      + " at start, then it exits; the daemon holds the programs and maps by descriptor."
                      + (" Loading the programs that compile kept (a restart): peak RSS "
                         + fmt_spread((c["cached_peak_mib"] for c in child), "{:.0f}", " MiB") + " for "
                         + fmt_spread((c["cached_seconds"] * 1000 for c in child), "{:.0f}", " ms") + "."
                         if all("cached_seconds" in c for c in child) else ""), ""]
    lines += cancel_latency.section() + cancel_again.section()
    lines += release_race.section()
    lines += vm_oomd.section()
    lines += scenario_cache.section() + giveback.section()
    lines += ["## Reproduce", "", "```", "sudo make bench                                   # = python -m benchmarks.run",
              "sudo .venv/bin/python -m benchmarks.run --help", "sudo .venv/bin/python -m benchmarks.run --quick",
              "# one scenario only, the others' results kept (here: MariaDB's)",
              "sudo .venv/bin/python -m benchmarks.run --scenarios moderate-hogs-mariadb --extras '' --merge",
              "sudo .venv/bin/python -m benchmarks.bpf.run --write   # BPF per-call cost",
              "sudo .venv/bin/python -m benchmarks.vm_oomd --runs 3     # systemd-oomd, in the cgroup v2 test VM",
              "sudo .venv/bin/python -m benchmarks.scenario_cache --runs 3   # the Redis cache (extra \"cache\")",
              "sudo .venv/bin/python -m benchmarks.giveback --runs 3   # memcached, PgBouncer steps (extra \"giveback\")",
              "sudo .venv/bin/python -m benchmarks.cancel_latency --runs 3   # the cancel: kernel vs user space",
              "sudo .venv/bin/python -m benchmarks.cancel_again --runs 10   # the cancel, statement after statement",
              "sudo .venv/bin/python -m benchmarks.release_race --runs 10   # a BPF-killed hog's memory released",
              "sudo .venv/bin/python -m benchmarks.pace --runs 1   # the loop's pace under pressure, 10,000 processes",
              "sudo .venv/bin/python -m benchmarks.table_memory --runs 3   # memory per process on the host",
              "```", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    """Render RESULTS.md and the plots again from results.json (no benchmark runs)."""
    try:
        data = json.loads(RESULTS_JSON.read_text())
    except (OSError, ValueError) as e:
        print(f"benchmarks: cannot read {RESULTS_JSON}: {e}; run the benchmarks first", file=sys.stderr)
        return 2
    write(data, RESULTS_MD, RESULTS_MD.parent)
    print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
