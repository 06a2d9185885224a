"""systemd-oomd as a contender, on the cgroup v2 test VM (lab/vm.py).

    python -m benchmarks.vm_oomd --runs 3      # as root, on the host: boots the VM, prints the table
    python -m benchmarks.vm_oomd --runs 1 --add    # one more round, added to the recorded runs

The moderate-hogs scenario (lab.scenario.run_pg_scenario: PostgreSQL with pgbench -S and six
150 MB hogs), laid out as on a systemd host: a slice with MemoryMax= holding the database's
unit and a sibling unit for the hogs (lab.systemd.placement "slice"). Contenders:

    kernel        nothing but the kernel's OOM killer
    systemd-oomd  as its documentation advises: ManagedOOMMemoryPressure=kill on the slice that
                  holds the hogs (oomd.conf defaults: 60 % memory pressure for 30 s) and
                  ManagedOOMPreference=avoid on the database's unit
    dbguard       `dbguard run`, no [pressure] cgroup: it finds the slice itself

Both units keep systemd's default OOMPolicy=stop (one kernel OOM kill in a unit stops the
whole unit), as on a stock host. The guest runs under TCG emulation: everything is several times slower than on the host, so
absolute times and tps are not comparable with benchmarks/RESULTS.md's other tables; who
survived and who was killed are.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
LIMIT = 1000 * MiB
CONTENDERS = ("kernel", "systemd-oomd", "dbguard")
OOMD_SLICE = {"ManagedOOMMemoryPressure": "kill"}
OOMD_DATABASE = {"ManagedOOMPreference": "avoid"}


def oomd_kills(since: float) -> list[str]:
    """systemd-oomd's own lines about what it killed since `since` (time.time())."""
    p = subprocess.run(["journalctl", "-u", "systemd-oomd", "-o", "cat", "--no-pager",
                        f"--since=@{int(since)}"], capture_output=True, text=True)
    return [ln for ln in p.stdout.splitlines() if "Killed" in ln]


def run_one(contender: str, duration: int, warmup: float) -> dict:
    from lab.scenario import run_pg_scenario
    from lab.systemd import placement
    oomd = contender == "systemd-oomd"
    # OOMPolicy=stop, systemd's default: a kernel OOM kill in a unit stops all of it.
    place = functools.partial(placement, "slice", LIMIT, slice_settings=OOMD_SLICE if oomd else None,
                              database_settings=OOMD_DATABASE if oomd else None, oom_policy="stop")
    t0 = time.time()
    r = run_pg_scenario("dbguard" if contender == "dbguard" else "none", placement=place,
                        duration=duration, warmup=warmup, log=lambda m: print(m, flush=True))
    return {"contender": contender, "database_survived": r.database_survived and not r.postmaster_restarted,
            "crash_recoveries": r.crash_recoveries, "sessions_lost": r.sessions_lost,
            "transactions_ok": r.transactions_ok, "hogs_killed": len(r.hogs_killed), "hogs": r.hogs,
            "kernel_oom_kills": r.oom_kills, "oom_victims": r.oom_victims,
            "oomd_kills": oomd_kills(t0), "time_to_first_kill": r.time_to_first_kill}


def guest(runs: int, out: Path, duration: int, warmup: float) -> None:
    results = []
    for i in range(runs):
        for c in CONTENDERS:
            print(f"--- run {i + 1}/{runs}: {c}", flush=True)
            results.append(run_one(c, duration, warmup))
            out.write_text(json.dumps(results, indent=1))


def table(results: list[dict]) -> str:
    rows = [("", *CONTENDERS)]
    by = {c: [r for r in results if r["contender"] == c] for c in CONTENDERS}

    def count(pred) -> tuple[str, ...]:
        return tuple(f"{sum(1 for r in by[c] if pred(r))}/{len(by[c])}" for c in CONTENDERS)
    rows.append(("database survived", *count(lambda r: r["database_survived"] and not r["crash_recoveries"])))
    rows.append(("runs with a kernel OOM kill", *count(lambda r: r["kernel_oom_kills"])))
    rows.append(("runs where oomd killed", *count(lambda r: r["oomd_kills"])))
    rows.append(("crash recoveries (sum)", *(str(sum(r["crash_recoveries"] for r in by[c])) for c in CONTENDERS)))
    rows.append(("sessions lost (sum)", *(str(sum(r["sessions_lost"] for r in by[c])) for c in CONTENDERS)))
    rows.append(("hogs ended by SIGKILL (sum)", *(f"{sum(r['hogs_killed'] for r in by[c])} of "
                                         f"{sum(r['hogs'] for r in by[c])}" for c in CONTENDERS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


RECORD = Path(__file__).resolve().parent / "vm-oomd.json"
HEADING = "## systemd-oomd, on a cgroup v2 host (the test VM)"


def section(path: Path = RECORD) -> list[str]:
    """RESULTS.md's section for the recorded run (benchmarks/report.py puts it in; main() too)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    text = table(data["runs"])
    return [HEADING, "",
            f"Recorded {data['recorded']}, git {data.get('git', '?')}, "
            f"{data.get('command') or _command(data['runs_per_contender'], data.get('duration', 30))} "
            f"({data['runs_per_contender']} runs per contender, {data['vm_seconds']} s in the VM, contenders interleaved). "
            "The moderate-hogs scenario (PostgreSQL, pgbench -S -c 8, six 150 MB hogs) on Debian 12's kernel "
            "6.1 with systemd 252 on the unified hierarchy: a slice with MemoryMax=1000M holds the database's "
            "unit and the hogs' unit. systemd-oomd is configured as its documentation advises "
            "(ManagedOOMMemoryPressure=kill on the slice, its defaults of 60 % pressure for 30 s, "
            "ManagedOOMPreference=avoid on the database's unit); the units keep systemd's default "
            "OOMPolicy=stop. Caveat: the VM runs under TCG emulation (KVM does not start a guest here), "
            "so the guest is several times slower than the host and its times and throughput are not "
            "comparable with the tables above; who survived and who was killed are. pgbench ran "
            f"{data.get('duration', 30)} s (the host's runs: 30 s) so that the hogs reach the limit under emulation.",
            "", "```", text, "```", "", *notes(data["runs"]), ""]


def _command(runs: int, duration: int, add: bool = False) -> str:
    return f"`sudo .venv/bin/python -m benchmarks.vm_oomd --runs {runs} --duration {duration}{' --add' if add else ''}`"


def notes(runs: list[dict]) -> list[str]:
    """What the table leaves out: whom the kernel killed, what systemd-oomd did."""
    out = []
    for c in CONTENDERS:
        mine = [r for r in runs if r["contender"] == c]
        victims = sorted({v for r in mine for v in r["oom_victims"]})
        oomd = [k for r in mine for k in r["oomd_kills"]]
        out.append(f"- {c}: kernel OOM victims {', '.join(victims) or 'none'}; systemd-oomd's kills: "
                   f"{len(oomd) or 'none'}; transactions ok per run {', '.join(str(r['transactions_ok']) for r in mine)}")
    return out


def record_section(results_md: Path) -> None:
    """Put section() into RESULTS.md in place of an older one, before "## Reproduce"."""
    text = results_md.read_text()
    lines = text.split("\n")
    new = section()
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    else:
        at = lines.index("## Reproduce") if "## Reproduce" in lines else len(lines)
        lines[at:at] = new
    results_md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vm_oomd", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=30, help="pgbench seconds per run (default 30)")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RECORD)
    ap.add_argument("--add", action="store_true", help="add the runs to those recorded in --out (same --duration)")
    a = ap.parse_args(argv)
    if a.guest:
        guest(a.runs, a.out, a.duration, a.warmup)
        return 0
    before = {"runs": [], "runs_per_contender": 0, "vm_seconds": 0}
    if a.add:
        try:
            before = json.loads(a.out.read_text())
        except (OSError, ValueError) as e:
            print(f"vm_oomd: --add: no record to add to in {a.out} ({e}); run without --add first", file=sys.stderr)
            return 1
        if before.get("duration") != a.duration:
            print(f"vm_oomd: --add: the recorded runs used --duration {before.get('duration')}; "
                  f"add runs with the same", file=sys.stderr)
            return 1
    from dbguard.errors import DbguardError
    from lab.vm import Vm
    try:
        vm = Vm()
    except DbguardError as e:
        print(f"vm_oomd: {e}", file=sys.stderr)
        return 1
    outdir = Path(tempfile.mkdtemp(prefix="dbguard-vm-oomd-"))
    run = vm.run(f"python3 -m benchmarks.vm_oomd --guest --runs {a.runs} --duration {a.duration} "
                 f"--warmup {a.warmup} --out /out/oomd.json", outdir, timeout=a.runs * 3 * 600)
    res = outdir / "oomd.json"
    if not res.exists():
        print(f"vm_oomd: no results (exit {run.rc}; outputs in {outdir}): {run.why()}", file=sys.stderr)
        return 1
    results = json.loads(res.read_text())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = _command(a.runs, a.duration, a.add)
    if a.add:
        now, git = f"{before['recorded']} and {now}", f"{before.get('git', '?')} and {git}"
        command = f"{before.get('command') or _command(before['runs_per_contender'], a.duration)} then {command}"
    results = before["runs"] + results
    a.out.write_text(json.dumps({"recorded": now, "git": git, "command": command,
                                 "runs_per_contender": before["runs_per_contender"] + a.runs, "duration": a.duration,
                                 "vm_seconds": before["vm_seconds"] + round(run.seconds),
                                 "runs": results}, indent=1) + "\n")
    print(table(results))
    if a.out == RECORD:
        record_section(RECORD.parent / "RESULTS.md")
    print(f"(recorded in {a.out}{' and RESULTS.md' if a.out == RECORD else ''}; guest log in {outdir}/job.log)")
    return 0 if run.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
