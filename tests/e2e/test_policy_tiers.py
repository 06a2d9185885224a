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

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import hog
from lab.cgroup import MemoryCgroup
from lab.scenario import audit_names, read_audit

MiB = 1024**2
LIMIT = 420 * MiB
REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _config(cg: MemoryCgroup, work: Path) -> Path:
    q = json.dumps      # a JSON string is a valid TOML basic string
    rel = cg.relpath
    cfg = work / "dbguard.toml"
    cfg.write_text("\n".join([
        "[general]",
        "interval = 0.2",
        f"state_dir = {q(str(work / 'state'))}",
        # A database that is not there: with no [[databases]] at all dbguard would discover
        # (and, under pressure, shrink) the host's own PostgreSQL servers.
        "[[databases]]",
        'name = "absent"',
        'kind = "postgresql"',
        f"dsn = {q('host=' + str(work / 'no-socket-here') + ' dbname=postgres')}",
        "shrink_steps = 0",
        "connect_timeout = 0.2",
        "[pressure]",
        f"cgroup = {q(str(cg.path))}",
        "min_dwell = 1.0",
        "[kill]",
        'min_rss = "16MiB"',
        "protect_exe = []",
        "[audit]",
        f"path = {q(str(work / 'audit.jsonl'))}",
        "[metrics]",
        'listen = ""',
        "[policy]",
        'tiers = ["free", "standard", "premium"]',
        'default_tier = "free"',
        "[[policy.rules]]",
        'name = "premium"',
        f"cgroup = {q(rel + '/premium/*')}",
        'action = "protect"',
        'tier = "premium"',
        "[[policy.rules]]",
        'name = "standard"',
        f"cgroup = {q(rel + '/standard/*')}",
        'tier = "standard"',
        "[[policy.rules]]",
        'name = "free"',
        f"cgroup = {q(rel + '/free/*')}",
        'tier = "free"',
        "",
    ]))
    return cfg


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _join(cg: MemoryCgroup, rel: str):
    path = cg.path / rel
    path.mkdir(parents=True, exist_ok=True)
    procs = path / "cgroup.procs"

    def join() -> None:
        procs.write_text("0")
    return join


def _kills(audit: list[dict], pids) -> list[dict]:
    """Kills of our processes (the BPF path audits every kernel OOM kill on the host)."""
    return [r for r in audit if r.get("action") in ("kill", "kernel_oom_kill")
            and any(audit_names(r, pid) for pid in pids) and not str(r.get("result", "")).startswith("skipped")]


def test_lower_tier_dies_first_higher_survives_protected_never(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root: memory cgroups and kills")
    audit_path = tmp_path / "audit.jsonl"
    procs: dict[str, subprocess.Popen] = {}
    tier_of: dict[int, str] = {}
    daemon: subprocess.Popen | None = None
    t0 = time.time()
    notes: list[tuple[float, str]] = []

    def note(what: str) -> None:
        notes.append((time.time() - t0, what))

    def start(name: str, rel: str, mib: int, interval: float = 0.0) -> subprocess.Popen:
        p = hog.spawn(mib * MiB, 4 * MiB, interval, 600, preexec_fn=_join(cg, rel), stdout=subprocess.DEVNULL)
        procs[name] = p
        tier_of[p.pid] = rel.split("/")[0]
        note(f"{name} (pid {p.pid}) in {rel}: {mib} MiB" + (f" at {4 / interval:.0f} MiB/s" if interval else ""))
        return p

    def report() -> str:
        rows = list(notes)
        for r in read_audit(audit_path):
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
            wait(lambda: _rss(procs[n].pid) >= target, 30, f"{n} at full size")

    def alive(name: str) -> bool:
        return procs[name].poll() is None

    with MemoryCgroup(LIMIT) as cg:
        try:
            start("vip", "premium/a", 60)
            start("std", "standard/a", 70)
            start("free1", "free/a", 40)
            ready("vip", "std", "free1")
            note(f"cgroup usage {cg.usage() // MiB} MiB of {LIMIT // MiB} MiB")

            out = open(tmp_path / "dbguard.out", "wb")
            daemon = subprocess.Popen(
                [sys.executable, "-c", "import sys; from dbguard.cli import main; sys.exit(main())",
                 "run", "--config", str(_config(cg, tmp_path))],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
            out.close()
            started = time.monotonic()
            wait(lambda: read_audit(audit_path) or daemon.poll() is not None or time.monotonic() - started > 10,
                 30, "dbguard start")
            assert daemon.poll() is None, f"dbguard exited with {daemon.returncode}\n{report()}"
            time.sleep(1.5)       # first cycles: scores raised, BPF maps filled
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
            wait(lambda: grow2.poll() is not None or not alive("std") or _rss(grow2.pid) >= 250 * MiB, 60,
                 "the end of phase 2")
            time.sleep(1.0)
            oom_kills = cg.oom_kills()
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            vip_alive = procs.get("vip") is not None and procs["vip"].poll() is None
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                p.wait()
            for d, _, _ in os.walk(cg.path, topdown=False):
                if Path(d) != cg.path:
                    for _ in range(100):
                        try:
                            os.rmdir(d)
                            break
                        except OSError:
                            time.sleep(0.05)

    text = report()
    print("\n" + text)
    audit = read_audit(audit_path)
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
    free1_pid = procs["free1"].pid
    free_deaths = [ts for ts, t, r in ordered if t == "free" and audit_names(r, free1_pid)]
    assert free_deaths, f"free1's death is not in the audit log\n{text}"
    std_kills = [ts for ts, t, _ in ordered if t == "standard"]
    assert all(ts >= min(free_deaths) for ts in std_kills), f"a standard-tier kill before free1's\n{text}"
    assert oom_kills == 0, f"the kernel OOM killer struck {oom_kills} time(s): dbguard was too late\n{text}"
