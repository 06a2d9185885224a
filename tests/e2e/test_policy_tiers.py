"""Tiers under real memory pressure, with `dbguard run` enforcing a [[policy.rules]] policy.

A 420 MiB memory cgroup with sub-groups free/, standard/ and premium/ (one rule each:
tier free, tier standard, protect). Hogs hold memory in each; then growing hogs push the
cgroup over its marks:

1. a free-tier hog grows: dbguard kills free-tier processes only; the standard one lives;
2. a standard-tier hog grows while a free-tier candidate is still alive: that free-tier
   process dies before any standard-tier process does, although the standard ones are
   bigger and one of them is the allocator;
3. the premium (protect rule) process is never killed, by dbguard or by the kernel.

Kills may come from user space or the BPF path (on when BPF works here, as in production):
both must follow the same order. Asserted from the audit log (kill records name the pid)
and from the processes themselves. The timeline is printed (pytest -s).
"""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest

from dbguard.errors import DbguardError
from lab import hog
from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun, audit_names, audit_records, base_config
from lab.procs import rss

MiB = 1024**2
LIMIT = 420 * MiB

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _config(cg: MemoryCgroup, work: Path) -> dict:
    rel = cg.relpath
    cfg = base_config(work, cg.path)
    cfg["general"]["interval"] = 0.2
    # A database that is not there: with no [[databases]] at all dbguard would discover
    # (and, under pressure, shrink) the host's own PostgreSQL servers.
    cfg["databases"] = [{"name": "absent", "kind": "postgresql",
                         "dsn": "host=" + str(work / "no-socket-here") + " dbname=postgres",
                         "shrink_steps": 0, "connect_timeout": 0.2}]
    cfg["pressure"]["min_dwell"] = 1.0
    cfg["kill"] = {"min_rss": "16MiB", "protect_exe": []}
    cfg["policy"] = {"tiers": ["free", "standard", "premium"], "default_tier": "free", "rules": [
        {"name": "premium", "cgroup": rel + "/premium/*", "action": "protect", "tier": "premium"},
        {"name": "standard", "cgroup": rel + "/standard/*", "tier": "standard"},
        {"name": "free", "cgroup": rel + "/free/*", "tier": "free"},
    ]}
    return cfg


def _kills(audit: list[dict], pids) -> list[dict]:
    """Kills of our processes (the BPF path audits every kernel OOM kill on the host)."""
    return [r for r in audit if r.get("action") in ("kill", "kernel_oom_kill")
            and any(audit_names(r, pid) for pid in pids) and not str(r.get("result", "")).startswith("skipped")]


def test_lower_tier_dies_first_higher_survives_protected_never(tmp_path, procs):
    audit_path = tmp_path / "audit.jsonl"
    named: dict[str, subprocess.Popen] = {}
    tier_of: dict[int, str] = {}
    daemon: DbguardRun | None = None
    t0 = time.time()
    notes: list[tuple[float, str]] = []

    def note(what: str) -> None:
        notes.append((time.time() - t0, what))

    def start(name: str, rel: str, mib: int, interval: float = 0.0) -> subprocess.Popen:
        p = procs.add(hog.spawn(mib * MiB, 4 * MiB, interval, 600, preexec_fn=cg.preexec(rel),
                                stdout=subprocess.DEVNULL))
        named[name] = p
        tier_of[p.pid] = rel.split("/")[0]
        note(f"{name} (pid {p.pid}) in {rel}: {mib} MiB" + (f" at {4 / interval:.0f} MiB/s" if interval else ""))
        return p

    def report() -> str:
        rows = list(notes)
        for r in audit_records(audit_path):
            if r.get("action") in ("set_oom_score_adj", None):
                continue
            rows.append((float(r.get("ts", t0)) - t0, f"audit: {r.get('action')} {r.get('target', '')} "
                         f"path={r.get('path', 'user')} result={r.get('result')} ({r.get('reason', '')})"))
        tail = (tmp_path / "dbguard.out").read_text(errors="replace")[-1500:] if (tmp_path / "dbguard.out").exists() else ""
        return "\n".join(f"{t:+8.2f}s  {w}" for t, w in sorted(rows)) + f"\ndbguard output tail:\n{tail}"

    def wait(cond, bound: float, what: str) -> None:
        deadline = time.monotonic() + bound       # a bound on waiting, not a speed assertion
        while not cond():
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not happen within {bound:g} s\n{report()}")
            time.sleep(0.1)

    def ready(*names: str) -> None:
        for n in names:
            target = {"vip": 60, "std": 70, "free1": 40}[n] * MiB * 0.9
            wait(lambda: rss(named[n].pid) >= target, 30, f"{n} at full size")

    def alive(name: str) -> bool:
        return named[name].poll() is None

    with MemoryCgroup(LIMIT) as cg:
        try:
            start("vip", "premium/a", 60)
            start("std", "standard/a", 70)
            start("free1", "free/a", 40)
            ready("vip", "std", "free1")
            note(f"cgroup usage {cg.usage() // MiB} MiB of {LIMIT // MiB} MiB")

            daemon = DbguardRun(tmp_path, _config(cg, tmp_path))
            try:
                daemon.wait_protecting(settle=1.5)       # then its first cycles: scores raised, BPF maps filled
            except DbguardError as e:
                pytest.fail(f"{e}\n{report()}")
            note("dbguard running")

            # 1. a free-tier hog grows past the marks
            grow1 = start("free-grow", "free/b", 260, interval=0.08)
            wait(lambda: grow1.poll() is not None, 60, "the growing free-tier hog's death")
            note(f"free-grow gone (exit {grow1.returncode})")
            time.sleep(1.0)
            assert alive("std") and alive("vip"), f"a standard or premium process died in phase 1\n{report()}"

            # 2. a standard-tier hog grows while free1 (free tier, smaller) is still a candidate
            assert alive("free1"), f"free1 died in phase 1 already; phase 2 needs it\n{report()}"
            grow2 = start("std-grow", "standard/b", 260, interval=0.08)
            wait(lambda: not alive("free1"), 60, "the free-tier process's death")
            note("free1 gone")
            # the standard-tier allocator goes on until it or another standard process is killed
            wait(lambda: grow2.poll() is not None or not alive("std") or rss(grow2.pid) >= 250 * MiB, 60,
                 "the end of phase 2")
            time.sleep(1.0)
            oom_kills = cg.oom_kills()
        finally:
            if daemon is not None:
                with contextlib.suppress(DbguardError):
                    daemon.stop(20)
            vip_alive = named.get("vip") is not None and named["vip"].poll() is None
            procs.close()

    text = report()
    print("\n" + text)
    audit = audit_records(audit_path)
    kills = _kills(audit, tier_of)
    assert kills, f"no kill in the audit log\n{text}"

    def tier_killed(r: dict) -> str | None:
        return next((tier for pid, tier in tier_of.items() if audit_names(r, pid)), None)

    ordered = [(float(r["ts"]), tier_killed(r), r) for r in kills]
    assert all(t is not None for _, t, _ in ordered), f"a kill names a process the test did not start\n{text}"
    # premium: protected by a rule, never killed by anyone
    assert vip_alive, f"the premium (protect rule) process died\n{text}"
    assert not any(t == "premium" for _, t, _ in ordered), f"a kill names the premium process\n{text}"
    # no standard-tier kill while a free-tier process was alive (free1 died in phase 2)
    free1_pid = named["free1"].pid
    free_deaths = [ts for ts, t, r in ordered if t == "free" and audit_names(r, free1_pid)]
    assert free_deaths, f"free1's death is not in the audit log\n{text}"
    std_kills = [ts for ts, t, _ in ordered if t == "standard"]
    assert all(ts >= min(free_deaths) for ts in std_kills), f"a standard-tier kill before free1's\n{text}"
    assert oom_kills == 0, f"the kernel OOM killer struck {oom_kills} time(s): dbguard was too late\n{text}"
