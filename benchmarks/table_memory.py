"""What each process on the host costs the daemon in memory (issue #17): the process table, the
classifier's and the policy's per-process state. A Daemon (dry run, no BPF, no database,
process events from the kernel as `dbguard run` has them) watching an empty memory cgroup runs
5 cycles; then N sleeping processes are started elsewhere (benchmarks.scale's spawner) and it
runs 10 more, which read them all. The growth in between, after a gc: Python's heap by
tracemalloc (what dbguard's objects hold, exactly), and RssAnon without tracemalloc, in another
process (what the host sees, with the allocator's own rounding: ±1 MiB arenas). --before REV
measures the code of git REV the same way (its tree exported to a temporary directory).

    sudo .venv/bin/python -m benchmarks.table_memory --runs 3 --before 6527938
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .record import Standalone, grouped, recorded, repeat

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TITLE = "Memory per process on the host: the process table and what is kept per process (issue #17)"
MiB = 1024**2
EXTRA = 5000
TARGET_MIB = 1.5


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def child(how: str, n: int) -> dict:
    """One measurement in this process ("trace": tracemalloc, "rss": RssAnon); a JSON line out."""
    import gc
    import tracemalloc

    from lab.cgroup import MemoryCgroup

    from .scale import dry_run_daemon, sleepers
    with MemoryCgroup(256 * MiB) as scope, tempfile.TemporaryDirectory(prefix="dbguard-bench-mem-") as tmp:
        d = dry_run_daemon(str(scope.path), tmp)
        try:
            for _ in range(5):
                d.cycle()
            if how == "trace":
                tracemalloc.start()
            gc.collect()
            t0, r0 = tracemalloc.get_traced_memory()[0], _rss_anon()
            with sleepers(n):
                for _ in range(10):
                    d.cycle()
                    time.sleep(0.05)
                gc.collect()
                t1, r1 = tracemalloc.get_traced_memory()[0], _rss_anon()
                seen = len(d.sensor.table.procs)
        finally:
            d.sensor.close()
    out = {"processes": seen, "traced_mib": (t1 - t0) / MiB} if how == "trace" else {"rss_anon_mib": (r1 - r0) / MiB}
    print(json.dumps(out))
    return out


def one(way: str, n: int = EXTRA) -> dict:
    """`way`: "now" (this checkout) or a git revision, measured in an export of its tree."""
    with tempfile.TemporaryDirectory(prefix="dbguard-bench-mem-tree-") as tree:
        where = REPO
        if way != "now":
            where = Path(tree)
            archive = subprocess.run(["git", "archive", way], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            shutil.copy(__file__, where / "benchmarks" / "table_memory.py")
        out: dict = {"way": way, "extra": n}
        for how in ("trace", "rss"):
            code = f"from benchmarks.table_memory import child; child({how!r}, {n})"
            p = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"{way}: {how} measurement failed: {p.stderr.strip().splitlines()[-1:]}")
            out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def body(data: dict) -> list[str]:
    rows = ["| code | extra processes | processes in the table | Python heap growth (tracemalloc), median | "
            "per process | RssAnon growth, median (range) | target |", "| --- | --- | --- | --- | --- | --- | --- |"]
    ways = list(dict.fromkeys(r["way"] for r in data["results"]))
    for way, runs in grouped(data["results"], "way", ways):
        traced, rss, n = [r["traced_mib"] for r in runs], [r["rss_anon_mib"] for r in runs], runs[0]["extra"]
        rows.append(f"| {'git ' + way if way != 'now' else 'now (git ' + data['git'] + ')'} | +{n:,} | "
                    f"{runs[0]['processes']:,} | {statistics.median(traced):.2f} MiB | "
                    f"{statistics.median(traced) * MiB / n:.0f} bytes | {statistics.median(rss):.2f} MiB "
                    f"({min(rss):.2f}-{max(rss):.2f}) | {TARGET_MIB} MiB |")
    return [recorded(data) + f" ({data['runs']} runs "
            "of each). " + " ".join(__doc__.split("\n\n")[0].split()), "", *rows, ""]


RECORD = Standalone("table_memory", TITLE, HERE / "table-memory.json", HERE / "TABLE-MEMORY-RESULTS.md", body)
section = RECORD.section


def main(argv: list[str] | None = None) -> int:
    def need() -> None:
        from lab import require
        require.memory_cgroups()

    def measure(a):
        return repeat(a.runs, [a.before, "now"] if a.before else ["now"], one,
                      lambda r: f"+{r['extra']}: traced {r['traced_mib']:.2f} MiB, RssAnon {r['rss_anon_mib']:.2f} MiB")
    return RECORD.main(argv, __doc__, need, measure,
                       lambda ap: ap.add_argument("--before", metavar="REV", help="measure git REV too (the code before)"))


if __name__ == "__main__":
    sys.exit(main())
