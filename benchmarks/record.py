"""What every benchmark scenario records, in one shape: the parameters of a run, the guard's
actions from its audit log, the sampler's series and the guard's own cost, and the figures
every pressure scenario reports (pressure_record)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .contenders import Sampler, guard_cpu_pct
from .stats import interleave, ratio, windowed_tps

MiB = 1024 * 1024
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Params:
    duration: int          # pgbench -T (or the storm's length)
    warmup: float          # load-free seconds at the start: the no-pressure baseline
    rounds: int = 0        # fast-hogs: rounds of hogs in one run


def baseline_window(p: Params) -> tuple[float, float]:
    """The last seconds before the load: pgbench's first seconds (connecting, caches warming)
    run at a fraction of its steady rate and would flatter every ratio."""
    return -min(4.0, p.warmup - 2.0), 0.0


def audit_summary(audit: list[dict], wall_t0: float) -> list[dict]:
    """The guard's actions (not start/stop/level bookkeeping), time relative to the load start."""
    skip = {"start", "stop", "reload", "bpf_attached", "bpf_failed"}
    out = []
    for rec in audit:
        if rec.get("action") in skip:
            continue
        out.append({"t": round(float(rec.get("ts", wall_t0)) - wall_t0, 3), "action": rec.get("action"),
                    "target": rec.get("target"), "path": rec.get("path"), "result": rec.get("result"),
                    "level": rec.get("level")})
    return out


def sampled_series(sampler: Sampler | None, t0: float) -> list[dict]:
    if sampler is None:
        return []
    return [{"t": round(s["t"] - t0, 3), "usage_mib": round(s["usage"] / MiB, 1), "psi_some": s["psi_some"],
             "psi_full": s["psi_full"], **({"guard_cpu_s": s["guard_cpu_s"]} if "guard_cpu_s" in s else {})}
            for s in sampler.samples]


def guard_cost(sink: dict, t0: float, window: float) -> dict:
    sampler: Sampler | None = sink.get("sampler")
    if sampler is None or sampler.guard_pid is None:
        return {}
    ready = sink.get("guard_ready", t0)
    rss = [s.get("guard_rss_kib") for s in sampler.samples if s.get("guard_rss_kib")]
    return {"guard_cpu_idle_pct": guard_cpu_pct(sampler.samples, ready, t0),
            "guard_cpu_pressure_pct": guard_cpu_pct(sampler.samples, t0, t0 + window),
            "guard_rss_mib": round(max(rss) / 1024, 1) if rss else None,
            "guard_peak_rss_mib": round(sampler.guard_hwm_kib / 1024, 1) if sampler.guard_hwm_kib else None}


def kill_actions(guard_actions: list[dict]) -> list[dict]:
    return [a for a in guard_actions if "kill" in str(a["action"]) or a["action"] in
            ("cancel_query", "terminate_session")]


def pressure_record(p: Params, sink: dict, t0: float, wall_minus_mono: float, *,
                    progress: list[tuple[float, float]], audit: list[dict], timeline: list,
                    limit_at: float | None, first_kill: float | None, db_deaths: list[str], **facts) -> dict:
    """The figures every pressure scenario reports, from what it saw: `progress` is the
    workload's (seconds since the load started, transactions/s), `timeline` the Watcher's
    events; `facts` (survival, sessions, victims, ...) go in as they are."""
    window = p.duration - p.warmup
    base = windowed_tps(progress, *baseline_window(p))
    under = windowed_tps(progress, 0.0, window)
    actions = audit_summary(audit, t0 + wall_minus_mono)
    return {
        **facts,
        "baseline_tps": base,
        "pressure_tps": under,
        "tps_ratio": ratio(under, base),
        "limit_reached_at": limit_at,
        "first_kill_at": first_kill,
        "time_to_first_kill": (first_kill - limit_at) if first_kill is not None and limit_at is not None else None,
        "db_processes_killed": len(db_deaths),
        "db_deaths": db_deaths[:10],
        "guard_kills": len(kill_actions(actions)),
        "guard_actions": actions[:200],
        "timeline": [[round(e.t, 3), e.what] for e in timeline],
        "tps_progress": [[round(t, 2), tps] for t, tps in progress],
        "samples": sampled_series(sink.get("sampler"), t0),
        **guard_cost(sink, t0, window),
    }


@dataclasses.dataclass(frozen=True)
class Standalone:
    """A benchmark with a record of its own (its json and markdown next to RESULTS.md), which
    RESULTS.md shows as a section: benchmarks.scenario_cache, benchmarks.giveback."""
    module: str                          # "scenario_cache": python -m benchmarks.<module>
    title: str
    json_path: Path
    md_path: Path
    body: Callable[[dict], list[str]]    # the report of a record, below its title

    def report(self, data: dict) -> str:
        return "\n".join([f"# Benchmark: {self.title}", "", *self.body(data)])

    def section(self) -> list[str]:
        """RESULTS.md's section for the recorded run; [] before any."""
        try:
            return [f"## {self.title}", "", *self.body(json.loads(self.json_path.read_text()))]
        except (OSError, ValueError, KeyError):
            return []

    def save(self, argv: list[str] | None, runs: int, results, out: Path | None = None) -> None:
        """The record (when, git, the command that reruns it, the results) and its report, written
        (in `out` instead of beside RESULTS.md when given) and printed."""
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=self.json_path.parent).stdout.strip()
        data = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git": git,
                "command": f"python -m benchmarks.{self.module} " + " ".join(argv if argv is not None else sys.argv[1:]),
                "runs": runs, "results": results}
        where = out or self.json_path.parent
        where.mkdir(parents=True, exist_ok=True)
        (where / self.json_path.name).write_text(json.dumps(data, indent=1) + "\n")
        (where / self.md_path.name).write_text(self.report(data))
        print(self.report(data))

    def main(self, argv: list[str] | None, doc: str, need: Callable[[], None],
             measure: Callable[[argparse.Namespace], Any],
             options: Callable[[argparse.ArgumentParser], None] = lambda ap: None) -> int:
        """The command line every standalone benchmark shares: `--runs`, `--out`; what it needs
        (`need` raises DbguardError) refused in one line, exit 2; then `measure(args)`'s
        results recorded."""
        from dbguard.errors import DbguardError
        ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{self.module}", description=doc.split("\n\n")[0])
        ap.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
        ap.add_argument("--out", type=Path, metavar="DIR",
                        help=f"write {self.json_path.name} and {self.md_path.name} in DIR, not beside RESULTS.md "
                             "(a smoke run leaves the recorded runs alone)")
        options(ap)
        a = ap.parse_args(argv)
        if a.runs < 1:
            ap.error(f"--runs {a.runs}: give 1 or more")
        try:
            need()
        except DbguardError as e:
            print(f"benchmarks.{self.module}: {e}", file=sys.stderr)
            return 2
        self.save(argv, a.runs, measure(a), a.out)
        return 0

    def main_repeated(self, argv: list[str] | None, doc: str, ways: Sequence[str], one: Callable[[str], dict],
                      line: Callable[[dict], str]) -> int:
        """main() of a benchmark that runs `one(way)` `--runs` times per way on a lab host (repeat)."""
        from lab.scenario import require_lab
        return self.main(argv, doc, require_lab, lambda a: repeat(a.runs, ways, one, line))


def recorded(data: dict) -> str:
    """A record's provenance, the first words of its report: when, at which git, the command."""
    return f"Recorded {data['when']}, git {data['git']}, `sudo .venv/bin/{data['command']}`"


def repeat(runs: int, ways: Sequence[str], one: Callable[[str], dict], line: Callable[[dict], str]) -> list[dict]:
    """`one(way)` for each way, `runs` times, interleaved (stats.interleave); a line printed after each."""
    out: list[dict] = []
    for i, way in interleave(ways, runs):
        out.append(one(way))
        print(f"run {i + 1}/{runs} {way}: {line(out[-1])}", flush=True)
    return out


def grouped(results: list[dict], key: str, ways: Sequence[str]) -> list[tuple[str, list[dict]]]:
    """(way, its runs) for each way that has runs, in the ways' order: a report's table rows."""
    return [(w, rs) for w in ways if (rs := [r for r in results if r[key] == w])]
