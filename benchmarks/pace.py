"""The loop's pace under pressure with many processes (issue #17): `dbguard run --dry-run` (no
BPF, no database) watching a memory cgroup that holds N sleeping processes (benchmarks.scale's
spawner) and a hog, the limit set so that the unreclaimable share stays between high_usage and
critical_usage (anonymous memory, no swap: no OOM, nothing to reclaim), so the level stays high
and every cycle reads the scope afresh. /metrics is polled every POLL s over the window: each
new dbguard_last_snapshot_timestamp_seconds is a cycle's time by the daemon's own clock, and
dbguard_cycles_total says how many cycles fell between two polls (several: the time between
the two timestamps is split evenly among them). CPU: the daemon's utime+stime over the window
(/proc/PID/stat), in % of one core, the polls' renders included. --before REV runs the daemon
of git REV the same way (its tree exported to a temporary directory; a daemon without
dbguard_cycles_total is counted one cycle per new timestamp).

    sudo .venv/bin/python -m benchmarks.pace --runs 1 --before 6527938
"""
from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .record import Standalone, recorded, repeat

HERE = Path(__file__).resolve().parent
TITLE = "The loop's pace under pressure with many processes (issue #17)"
MiB = 1024**2
EXTRA = ("0", "10000")
HOG = 512 * MiB
RATIO = 0.93            # unreclaimable / limit: above high_usage (0.90), below critical_usage (0.96)
POLL = 0.1              # half the pressed interval: a poll sees each cycle apart
SETTLE = 5.0            # after "start": the births read, the level reached
WINDOW = 30.0
PRESSED_INTERVAL = 0.2  # dbguard.daemon.PRESSED_INTERVAL, said in the report


def _need() -> None:
    from lab import require
    require.memory_cgroups()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    want = ("dbguard_last_snapshot_timestamp_seconds", "dbguard_cycles_total", "dbguard_pressure_level")
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M) if m.group(1) in want}


def intervals(polls: list[dict[str, float]]) -> list[float]:
    """Seconds between consecutive cycles, from polls of (timestamp of the last cycle, cycles so far)."""
    out: list[float] = []
    for a, b in zip(polls, polls[1:]):
        counted = "dbguard_cycles_total" in a and "dbguard_cycles_total" in b
        n = b["dbguard_cycles_total"] - a["dbguard_cycles_total"] if counted else \
            int(b["dbguard_last_snapshot_timestamp_seconds"] != a["dbguard_last_snapshot_timestamp_seconds"])
        if n > 0:
            dt = b["dbguard_last_snapshot_timestamp_seconds"] - a["dbguard_last_snapshot_timestamp_seconds"]
            out += [dt / n] * int(n)
    return out


def _reading(cg):
    """The scope's memory as dbguard reads it (its unreclaimable share is what the level judges)."""
    from dbguard.sense.pressure import PressureMonitor
    monitor = PressureMonitor(str(cg.path), trigger_stall_us=0, trigger_window_us=0)
    try:
        return monitor.read()
    finally:
        monitor.close()


def one(way: str) -> dict:
    """`way`: "N" (sleepers, this checkout's daemon) or "N@REV" (git REV's daemon)."""
    extra, _, rev = way.partition("@")
    with tempfile.TemporaryDirectory(prefix="dbguard-bench-pace-tree-") as tree:
        command = None
        if rev:
            archive = subprocess.run(["git", "archive", rev], cwd=HERE.parent, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {tree!r}); "
                       "from dbguard.cli import main; sys.exit(main())"]
        return {"code": rev or "now", **_one(int(extra), command)}


def _one(n: int, command: list[str] | None) -> dict:
    from lab.cgroup import MemoryCgroup
    from lab.hog import spawn, wait_holding
    from lab.launcher import DbguardRun, base_config
    from lab.procs import CLK_TCK, cpu_ticks

    from .scale import SPAWNER
    with MemoryCgroup(8192 * MiB) as cg, tempfile.TemporaryDirectory(prefix="dbguard-bench-pace-") as tmp:
        spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, str(n)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, preexec_fn=cg.preexec())
        hog = None
        try:
            if spawner.stdout.readline().strip() != "ready":
                raise RuntimeError(f"could not spawn {n} sleeping processes")
            hog = spawn(HOG, 32 * MiB, 0, 600, preexec_fn=cg.preexec(), stdout=subprocess.PIPE)
            wait_holding(hog)
            cg.set_limit(int(_reading(cg).unreclaimable_bytes / RATIO))
            port = _free_port()
            cfg = base_config(Path(tmp), cg.path)
            cfg["general"]["discover"] = False
            cfg["bpf"] = {"enabled": False}
            cfg["metrics"]["listen"] = f"127.0.0.1:{port}"
            url = f"http://127.0.0.1:{port}/metrics"
            with DbguardRun(Path(tmp), cfg, "--dry-run", command=command) as run:
                run.wait_protecting(settle=SETTLE)
                polls, c0, t0 = [], cpu_ticks(run.pid), time.monotonic()
                while time.monotonic() - t0 < WINDOW:
                    polls.append(_scrape(url))
                    time.sleep(POLL)
                c1, t1 = cpu_ticks(run.pid), time.monotonic()
                if not run.running():
                    raise RuntimeError(f"dbguard exited during the window: {run.tail(3)}")
            reading = _reading(cg)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            spawner.stdin.write("done\n")
            spawner.stdin.flush()
            spawner.wait(60)
    iv = sorted(intervals(polls))
    return {"extra": n, "cycles": len(iv), "window_s": round(t1 - t0, 2),
            "interval_median_s": statistics.median(iv), "interval_p95_s": iv[int(0.95 * (len(iv) - 1))],
            "interval_max_s": iv[-1], "cpu_pct": 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0),
            "counter": all("dbguard_cycles_total" in p for p in polls),
            "high_share": sum(p.get("dbguard_pressure_level", 0) >= 2 for p in polls) / len(polls),
            "unreclaimable_ratio": round(reading.unreclaimable_ratio, 3), "limit_mib": round(reading.limit_bytes / MiB)}


def body(data: dict) -> list[str]:
    rows = ["| code | extra sleeping processes in the scope | cycles | interval between cycles, median | p95 | max | "
            "dbguard CPU, % of one core | polls at level high or above | unreclaimable / limit at the end |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(data["results"], key=lambda r: (r["extra"], r.get("code", "now") == "now")):
        code = r.get("code", "now")
        rows.append(f"| {'git ' + code if code != 'now' else 'now (git ' + data['git'] + ')'} | +{r['extra']:,} | "
                    f"{r['cycles']} in {r['window_s']:.0f} s | {r['interval_median_s'] * 1000:.0f} ms | "
                    f"{r['interval_p95_s'] * 1000:.0f} ms | {r['interval_max_s'] * 1000:.0f} ms | "
                    f"{r['cpu_pct']:.1f} % | {r['high_share']:.0%} | {r['unreclaimable_ratio']:.2f} "
                    f"(limit {r['limit_mib']} MiB) |")
    return [recorded(data) + f" ({data['runs']} run(s) "
            f"of each). `dbguard run --dry-run` (no BPF, no database) watching a memory cgroup that holds the "
            f"sleepers and a {HOG // MiB} MiB hog, the limit set so that the unreclaimable share is {RATIO} (high "
            f"level, below critical): every cycle reads the scope afresh. The pressed interval is "
            f"{PRESSED_INTERVAL} s, counted from the start of a cycle since git fd2785e (before: from the end "
            f"of its work, so the interval was that plus one cycle's work). Intervals from the daemon's own clock "
            f"(dbguard_last_snapshot_timestamp_seconds and dbguard_cycles_total, /metrics polled every {POLL} s over "
            f"{WINDOW:.0f} s); CPU is utime+stime over the window, the polls' renders included.", "", *rows, ""]


RECORD = Standalone("pace", TITLE, HERE / "pace.json", HERE / "PACE-RESULTS.md", body)
section = RECORD.section


def main(argv: list[str] | None = None) -> int:
    def measure(a):
        extras = a.extra.split(",")
        ways = [w for x in extras for w in ([f"{x}@{a.before}"] if a.before else []) + [x]]
        return repeat(a.runs, ways, one,
                      lambda r: f"{r['code']} +{r['extra']}: median {r['interval_median_s'] * 1000:.0f} ms, p95 "
                                f"{r['interval_p95_s'] * 1000:.0f} ms, CPU {r['cpu_pct']:.1f} %, "
                                f"high {r['high_share']:.0%}")

    def options(ap) -> None:
        ap.add_argument("--extra", default=",".join(EXTRA),
                        help=f"sleeping processes to add, comma-separated (default {','.join(EXTRA)})")
        ap.add_argument("--before", metavar="REV", help="run git REV's daemon too (the code before)")
    return RECORD.main(argv, __doc__, _need, measure, options)


if __name__ == "__main__":
    sys.exit(main())
