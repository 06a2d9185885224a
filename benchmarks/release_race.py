"""A BPF kill in the victim's own context, then the sidecar's release of its memory: how often
the release comes before the victim's own exit has let go of it (issues #15, #19).

One hog allocating at full speed (8 MiB steps, every page touched) in a 192 MiB memory cgroup,
listed by nobody: the BPF program kills it in its own context at its failing-reclaim streak
(the gate a daemon sets at level ok, as tests/e2e/test_bpf_alone.py). The sidecar's own event
path answers the kill (KernelFeed.drain on a Daemon, woken by the ring buffer's descriptor as
`dbguard run` is): its audit record says whether process_mrelease released the victim's memory,
or why not. Also recorded: the time from the kill (the event's clock) to the audit record, and
the cgroup's kernel OOM kills.

    sudo .venv/bin/python -m benchmarks.release_race --runs 10
"""
from __future__ import annotations

import json
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .record import Standalone, recorded, repeat

HERE = Path(__file__).resolve().parent
TITLE = "The release of a BPF-killed hog's memory: in time or after its own exit (issues #15, #19)"
MiB = 1024**2
BOUND = 60.0          # bound on waiting for the kill, not a measurement


def _need() -> None:
    from dbguard.errors import DbguardError
    from dbguard.kernel.bpf import availability
    usable, why = availability()
    if not usable:
        raise DbguardError(f"this benchmark needs BPF: {why}")


def one(guard, _way: str) -> dict:
    from dbguard import config
    from dbguard.audit import AuditLog
    from dbguard.daemon import Daemon
    from dbguard.kernel.feed import KernelFeed
    from dbguard.metrics import Metrics
    from lab.cgroup import MemoryCgroup
    from lab.hog import UNLIMITED, spawn
    with MemoryCgroup(192 * MiB) as cg, tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(config.from_dict({}))
        daemon.feed = KernelFeed(guard, daemon.cfg, [str(cg.path)])
        daemon.audit = AuditLog(str(Path(tmp) / "audit.jsonl"))
        daemon.metrics = Metrics("")
        guard.set_policy(level=0, enabled=True, dry_run=False, min_level_to_kill=3, fail_streak=3,
                         early_streak=8, min_anon_bytes=32 * MiB)
        hog = spawn(UNLIMITED, 8 * MiB, 0, 600, preexec_fn=cg.preexec(), stdout=subprocess.DEVNULL)
        poller = select.poll()
        poller.register(guard.wake_fd(), select.POLLIN)
        kill = None
        deadline = time.monotonic() + BOUND
        try:
            while kill is None and time.monotonic() < deadline and hog.poll() is None:
                poller.poll(100)
                kill = next((e for e in daemon.feed.drain(daemon) if e.kind == "kill" and e.tgid == hog.pid), None)
            audited = time.time()
        finally:
            hog.kill()
            hog.wait()
            guard.set_policy(level=0, enabled=False, dry_run=False)
            guard.set_scope(None, unlisted=False)
        recs = [json.loads(line) for line in open(Path(tmp) / "audit.jsonl")]
        rec = next((r for r in recs if r.get("action") == "kill" and r.get("pid") == hog.pid), None)
        d = rec["detail"] if rec else {}
        return {"way": "bpf", "killed": kill is not None, "memory_released": d.get("memory_released"),
                "why_not": d.get("release"), "result": rec["result"] if rec else None,
                "kill_to_audit_ms": round((audited - kill.ts_ns / 1e9) * 1000, 3) if kill else None,
                "kernel_oom_kills": cg.oom_kills()}


def body(data: dict) -> list[str]:
    runs = data["results"]
    ms = sorted(r["kill_to_audit_ms"] for r in runs if r["kill_to_audit_ms"] is not None)
    outcomes = Counter("released" if r["memory_released"] else (r["why_not"] or "no kill") for r in runs)
    return [recorded(data) + " "
            f"({data['runs']} runs). One unlisted hog at full speed in a 192 MiB memory cgroup, killed by the BPF "
            "program in its own context; the sidecar's event path (KernelFeed.drain, woken by the ring buffer) "
            "releases its memory by pidfd (process_mrelease) and audits the kill. Released: process_mrelease "
            "returned 0, so the victim still held its mm when the sidecar's call came (reaped by that call, or by the "
            "kernel's OOM reaper just before, which it also answers with 0); not released: ESRCH, its exit had let "
            "go of the mm first.", "",
            "| runs | BPF kills | memory released | not released, and why | kill → audit record, median | max | kernel OOM kills |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {len(runs)} | {sum(r['killed'] for r in runs)} | {outcomes.get('released', 0)} | "
            + ("; ".join(f"{n}: {why}" for why, n in outcomes.items() if why != "released") or "–")
            + f" | {f'{statistics.median(ms):.2f} ms' if ms else '–'} | {f'{ms[-1]:.2f} ms' if ms else '–'} | "
            f"{sum(r['kernel_oom_kills'] for r in runs)} |", ""]


RECORD = Standalone("release_race", TITLE, HERE / "release-race.json", HERE / "RELEASE-RESULTS.md", body)
section = RECORD.section


def main(argv: list[str] | None = None) -> int:
    def measure(a):
        from dbguard.kernel.bpf import BpfGuard
        with BpfGuard.load() as guard:
            return repeat(a.runs, ["bpf"], lambda way: one(guard, way),
                          lambda r: f"released {r['memory_released']} ({r['why_not'] or ''}); "
                                    f"kill → audit {r['kill_to_audit_ms']} ms; OOM kills {r['kernel_oom_kills']}")
    return RECORD.main(argv, __doc__, _need, measure)


if __name__ == "__main__":
    sys.exit(main())
