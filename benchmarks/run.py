"""dbguard against the kernel default, the databases' documented setups and earlyoom, side by side.

    sudo .venv/bin/python -m benchmarks.run                 # everything (make bench): ~58 min (measured:
                                                            # 31 min, then 13 for moderate-hogs-mariadb;
                                                            # fast-hogs 279 s a repeat, estimated 14 min)
    sudo .venv/bin/python -m benchmarks.run --quick         # one round, shorter loads, ~16 min (estimated)
    sudo .venv/bin/python -m benchmarks.run --scenarios runaway --contenders none,dbguard-user -r 5
    sudo .venv/bin/python -m benchmarks.run -s moderate-hogs-mariadb -x '' --merge   # 13 min; others kept
    .venv/bin/python -m benchmarks.run --report-only        # re-render RESULTS.md from results.json
                                                            # (= python -m benchmarks.report)

Each scenario runs its contenders interleaved (A B C A B C ...), each run in a fresh memory
cgroup with a fresh database (PostgreSQL, or MariaDB for moderate-hogs-mariadb) and data set;
a contender made for one database (pg-documented, mariadb-documented) runs only next to it.
Raw figures go to benchmarks/results.json, the report to benchmarks/RESULTS.md, timelines to
benchmarks/timeline-*.png. The in-kernel programs' own cost is benchmarks/bpf (run with
--bpf-bench, or alone).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import signal
import subprocess
import sys
import time
import traceback

from dbguard.errors import DbguardError

from .files import HERE, RESULTS_JSON, RESULTS_MD
from .machine import machine

EARLIER_KEPT = 2        # earlier records of an extra kept when it is measured again
CONTENDERS = ("none", "pg-documented", "mariadb-documented", "earlyoom", "dbguard-user", "dbguard-bpf")
SCENARIO_NAMES = ("moderate-hogs", "parent-limit", "moderate-hogs-mariadb", "fast-hog", "fast-hogs", "runaway",
                  "fork-storm", "sessions", "sessions-mariadb")
EXTRAS = ("scale", "cost", "cache", "giveback")


def _csv(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios: " + ", ".join(SCENARIO_NAMES) + "\ncontenders: " + ", ".join(CONTENDERS)
        + "\nextras: scale (one cycle's cost against 100-20,000 processes: at rest, under pressure, full read; 500 backends), "
        "cost (dbguard's own CPU, RSS, startup; idle and with 5,000 extra processes), "
        "cache (a Redis cache in front of PostgreSQL: benchmarks.scenario_cache), giveback (what memcached and "
        "PgBouncer give back a step: benchmarks.giveback)"
        "\n\nNeeds root, a memory cgroup controller, PostgreSQL 15, "
        "MariaDB 10.11 and earlyoom (make setup). Ctrl-C stops and cleans up.")
    ap.add_argument("-s", "--scenarios", type=_csv(SCENARIO_NAMES, "scenario"), default=list(SCENARIO_NAMES),
                    metavar="LIST", help="comma-separated scenarios (default: all)")
    ap.add_argument("-c", "--contenders", type=_csv(CONTENDERS, "contender"), default=list(CONTENDERS),
                    metavar="LIST", help="comma-separated contenders (default: all; each scenario runs those "
                    "made for its database)")
    ap.add_argument("-r", "--repeats", type=int, default=None, metavar="N",
                    help="runs per contender and scenario (default 3, with --quick 1)")
    ap.add_argument("-x", "--extras", type=_csv(EXTRAS, "extra"), default=list(EXTRAS), metavar="LIST",
                    help="scale,cost, or '' for none (default: both)")
    ap.add_argument("--quick", action="store_true",
                    help="one round, shorter loads, scale with 1,000 processes only: a smoke run (~16 min, estimated)")
    ap.add_argument("--bpf-bench", action="store_true",
                    help="also run python -m benchmarks.bpf.run --write (the BPF programs' per-call cost)")
    ap.add_argument("--merge", action="store_true",
                    help="keep earlier results.json entries for scenarios/contenders not run now")
    ap.add_argument("--report-only", action="store_true", help="only re-render RESULTS.md and plots from results.json")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the per-run summary lines")
    a = ap.parse_args(argv)
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    if a.repeats < 1:
        ap.error("--repeats: must be at least 1")
    return a


def _git_rev() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True)
    return r.stdout.strip() or "?"


def _say(quiet: bool):
    t0 = time.monotonic()

    def say(msg: str, always: bool = False) -> None:
        if always or not quiet:
            print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)
    return say


def one_line(scenario: str, rec: dict) -> str:
    if rec.get("error"):
        return f"ERROR {rec['error']}"
    if scenario == "fork-storm":
        cov = rec.get("coverage", {})
        return (f"{rec.get('connections_per_s') or 0:.0f} conn/s, coverage at birth bpf={cov.get('bpf_at_birth')} "
                f"lowered={cov.get('lowered_score_at_birth')} of {cov.get('held')}")
    ttk = rec.get("time_to_first_kill")
    return (f"survived={rec.get('db_survived')} recoveries={rec.get('crash_recoveries')} "
            f"lost={rec.get('sessions_lost')} ratio={rec.get('tps_ratio') or 0:.2f} "
            f"hogs_killed={rec.get('hogs_killed', '-')} db_killed={rec.get('db_processes_killed')} "
            f"first_kill={'-' if ttk is None else f'{ttk * 1000:.0f} ms'}"
            + (f" runaway={rec['runaway_outcome']}" if "runaway_outcome" in rec else "")
            + (f" large: finished={rec['large_finished']} cancelled={rec['large_cancelled']} "
               f"terminated={rec['large_terminated']} failed={rec['large_failed']} "
               f"oom_kills={rec.get('kernel_oom_kills')}" if "large_finished" in rec else "")
            + (f" restarts={rec['db_restarts']} pool={rec.get('pool_configured_mib')}->{rec.get('pool_min_mib')}"
               f"->{rec.get('pool_final_mib')} MiB" if "pool_configured_mib" in rec else ""))


def run_scenarios(a: argparse.Namespace, say, data: dict) -> None:
    from .contenders import all_contenders, dbguard_available, for_database
    from .scenarios import DATABASE, DEFAULTS, QUICK, SCENARIOS
    from .stats import interleave

    contenders = all_contenders()
    missing = dbguard_available()
    chosen = list(a.contenders)
    if missing and any(contenders[c].is_dbguard for c in chosen):
        say(f"leaving out dbguard-user and dbguard-bpf: {missing}", always=True)
        chosen = [c for c in chosen if not contenders[c].is_dbguard]
    params = QUICK if a.quick else DEFAULTS
    if "fast-hog" in a.scenarios:
        from .scenarios import hog_alloc_rate
        try:
            data["machine"]["hog_alloc_gib_s"] = round(hog_alloc_rate(), 2)
            say(f"fast hog allocates {data['machine']['hog_alloc_gib_s']} GiB/s with no limit near", always=True)
        except Exception as e:
            say(f"could not measure the fast hog's allocation rate: {e}", always=True)
    for scen in a.scenarios:
        p = params[scen]
        runs = data.setdefault("runs", [])
        here = for_database(chosen, DATABASE[scen])
        started_scen = time.time()
        for rnd, name in interleave(here, a.repeats):
            c = contenders[name]
            c.notes = []
            say(f"{scen} round {rnd + 1}/{a.repeats}: {name}", always=True)
            started = time.time()
            try:
                rec = SCENARIOS[scen](c, p, lambda m: say("  " + m))
            except KeyboardInterrupt:
                raise
            except Exception as e:       # one failed run is a result too; the others go on
                rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                say("  " + traceback.format_exc().strip().replace("\n", "\n  "))
            rec.update(scenario=scen, contender=name, round=rnd, started=started,
                       seconds=round(time.time() - started, 1), notes=list(c.notes),
                       params={"duration": p.duration, "warmup": p.warmup, **({"rounds": p.rounds} if p.rounds else {})})
            runs.append(rec)
            say(f"  -> {one_line(scen, rec)}", always=True)
            data.setdefault("provenance", {})[scen] = _provenance(data, round(time.time() - started_scen))
            _save(data)


def _provenance(data: dict, seconds: int | None) -> dict:
    """When, from which commit, with which command and on which machine a scenario's runs (or
    an extra) were made: a merged results.json holds them from several invocations, and the
    VM behind this box may differ between them."""
    return {"date": data.get("date"), "git": data.get("git"), "command": data.get("command"), "seconds": seconds,
            "machine": data.get("machine", {})}


def _save(data: dict) -> None:
    tmp = RESULTS_JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(RESULTS_JSON)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    say = _say(a.quiet)
    from . import report

    if a.report_only:
        return report.main()

    from lab.scenario import require_lab
    try:
        require_lab()
    except DbguardError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # clean up as for Ctrl-C

    old = {}
    if a.merge and RESULTS_JSON.exists():
        with __import__("contextlib").suppress(ValueError):
            old = json.loads(RESULTS_JSON.read_text())
    cmd = "python -m benchmarks.run " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    data = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": cmd.strip(),
        "git": _git_rev(),
        "machine": machine(),
        "options": {"scenarios": a.scenarios, "contenders": a.contenders, "repeats": a.repeats,
                    "quick": a.quick, "extras": a.extras},
        "runs": [],
    }
    if old:
        keep = [r for r in old.get("runs", []) if r.get("scenario") not in a.scenarios
                or r.get("contender") not in a.contenders]
        data["runs"] = keep
        for k in ("scale", "cost", "bpf_bench"):
            if k in old and k not in a.extras:
                data[k] = old[k]
        data["merged_from"] = old.get("date")
        # Where the kept runs and extras came from (a results.json from before provenance: the whole file).
        prov = old.get("provenance") or {s: _provenance(old, old.get("seconds")) for s in
                                          [*dict.fromkeys(r.get("scenario") for r in old.get("runs", [])),
                                           *(k for k in EXTRAS if k in old)]}
        data["provenance"] = {s: v for s, v in prov.items()
                              if any(r.get("scenario") == s for r in keep) or (s in EXTRAS and s in data)}
        # An extra measured again: the last records stay beside it (the report shows before and after).
        earlier = old.get("earlier") or {}
        for k in ("scale", "cost"):
            if k in old and k in a.extras:
                earlier[k] = [{"provenance": prov.get(k, {}), "data": old[k]}, *earlier.get(k, [])][:EARLIER_KEPT]
        if earlier:
            data["earlier"] = earlier
    t_all = time.monotonic()
    try:
        run_scenarios(a, say, data)
        if "scale" in a.extras:
            from . import scale
            say("scale: one sense+classify cycle", always=True)
            t_x = time.time()
            data["scale"] = scale.run(quick=a.quick, log=lambda m: say("  " + m, always=True))
            data.setdefault("provenance", {})["scale"] = _provenance(data, round(time.time() - t_x))
            _save(data)
        if "cost" in a.extras:
            from . import cost
            say("cost: dbguard's own CPU, RSS and startup", always=True)
            t_x = time.time()
            data["cost"] = cost.run(quick=a.quick, log=lambda m: say("  " + m, always=True))
            data.setdefault("provenance", {})["cost"] = _provenance(data, round(time.time() - t_x))
            _save(data)
        for name, module in (("cache", "scenario_cache"), ("giveback", "giveback")):
            if name in a.extras:       # each keeps its own record (its *-results.json); RESULTS.md shows it
                say(f"{name}: python -m benchmarks.{module}", always=True)
                runs = ["--runs", "1" if a.quick else "3"]
                subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *runs], cwd=HERE.parent)
        if a.bpf_bench:
            say("BPF programs: python -m benchmarks.bpf.run --write", always=True)
            r = subprocess.run([sys.executable, "-m", "benchmarks.bpf.run", "--write"], cwd=HERE.parent)
            data["bpf_bench"] = {"exit": r.returncode, "results": "benchmarks/bpf/RESULTS.md"}
    except KeyboardInterrupt:
        say("interrupted: writing what was measured so far", always=True)
    finally:
        data["seconds"] = round(time.monotonic() - t_all)
        _save(data)
        report.write(data, RESULTS_MD, HERE)
        say(f"wrote {RESULTS_JSON.name}, {RESULTS_MD.name} and plots in {HERE}", always=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
