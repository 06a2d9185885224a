"""The kernel's cancel statement after statement: the same backend sorts past the limit twice,
with `[bpf] cancel_level` off and at its default (critical).

The second sort starts where the first was cancelled: its memory cgroup's page cache is
already spent, so once it reaches the limit reclaim runs dry within a few passes. A SIGINT
sent at the first pass that freed nothing (cancel_level = 0) must wait for the allocation in
flight, and where nothing is left to reclaim the kernel OOM-kills the backend first (crash
recovery). From cancel_level on every reclaim pass of the backend counts, and the SIGINT goes
at the limit, while reclaim still meets the allocation.

One PostgreSQL 15 client backend, 20M rows sorted with work_mem=4GB in a 300 MB memory cgroup,
twice (lab/backend_cancel.py, repeat=2, as tests/e2e/test_bpf_cancel.py), `[bpf] cancel` on and
the user-space session answer out of reach, `--runs` times per way, interleaved:

    level-off   [bpf] cancel_level = 0: the backend's passes count only when they free nothing
    default     cancel_level as the config's default leaves it (3, critical)

What is recorded comes from the client (each statement's own error), the cgroup's OOM counter
and the server log (crash recoveries); dbguard's audit says which rule each cancel came by
(`at_limit`) and at which level.

    sudo .venv/bin/python -m benchmarks.cancel_again --runs 10
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cancel_latency import SORTING
from .record import Standalone, grouped, recorded

HERE = Path(__file__).resolve().parent
TITLE = "The cancel, statement after statement: [bpf] cancel_level off and at its default"
WAYS = ("level-off", "default")


def one(way: str) -> dict:
    from lab.backend_cancel import run_backend_cancel
    r = run_backend_cancel(kernel_cancel=None, repeat=2, bpf={"cancel_level": 0} if way == "level-off" else None)
    cancels = [a for a in r.audit if a.get("action") == "cancel_query"]
    return {"way": way, "statements": [e or "finished" for _, e in r.statements],
            "both_cancelled": r.statements_cancelled == [True, True],
            "kernel_oom_kills": r.oom_kills, "crash_recoveries": r.crash_recoveries,
            "seconds": [round(s, 3) for s in r.durations],
            "cancels": [{"path": a.get("path"), "level": a.get("level"), "at_limit": a["detail"].get("at_limit"),
                         "result": a.get("result")} for a in cancels]}


def body(data: dict) -> list[str]:
    runs = data["results"]
    lines = [recorded(data) + " "
             f"({data['runs']} runs per way, interleaved). {SORTING}, twice in a row (lab/backend_cancel.py, "
             "repeat=2); "
             "`[bpf] cancel` on, the user-space session answer out of reach. level-off: `cancel_level = 0` "
             "(a pass counts toward the cancel only when it freed nothing); default: `cancel_level` as the "
             "config's default leaves it (critical). A run passes when both statements end with "
             "PostgreSQL's cancel and the cgroup counted no OOM kill.", "",
             "| way | runs | both statements cancelled, no OOM kill | kernel OOM kills | crash recoveries | "
             "kernel cancels | of them at the limit (cancel_level) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for way, mine in grouped(runs, "way", WAYS):
        cancels = [c for r in mine for c in r["cancels"] if c["path"] == "bpf"]
        lines.append(f"| {way} | {len(mine)} | "
                     f"{sum(r['both_cancelled'] and not r['kernel_oom_kills'] for r in mine)} | "
                     f"{sum(r['kernel_oom_kills'] for r in mine)} | {sum(r['crash_recoveries'] for r in mine)} | "
                     f"{len(cancels)} | {sum(bool(c['at_limit']) for c in cancels)} |")
    lines += ["", *[f"- {r['way']}: {' / '.join(r['statements'])}; OOM kills {r['kernel_oom_kills']}; cancels "
                    f"{[(c['level'], 'at limit' if c['at_limit'] else 'failed reclaim') for c in r['cancels']]}"
                    for r in runs], ""]
    return lines


RECORD = Standalone("cancel_again", TITLE, HERE / "cancel-again.json", HERE / "CANCEL-AGAIN-RESULTS.md", body)
section = RECORD.section


def main(argv: list[str] | None = None) -> int:
    return RECORD.main_repeated(argv, __doc__, WAYS, one,
                                lambda r: f"{' / '.join(r['statements'])}; OOM kills {r['kernel_oom_kills']}")


if __name__ == "__main__":
    sys.exit(main())
