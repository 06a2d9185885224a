"""dbguard's own cost: startup to "protecting", CPU at idle, RSS steady and at its peak.

`dbguard run` is started as a subprocess (as lab.scenario.dbguard_guard does) watching an
idle throwaway PostgreSQL in a 1000 MB memory cgroup. Startup: from spawn to its "start"
audit record (written once the config is loaded, the database reached, BPF compiled and
attached, and memory locked: the moment it is protecting). Idle CPU: utime+stime over the
idle window after that. RSS steady: VmRSS at the end; peak: VmHWM, which with BPF is the BCC
compile. CPU under pressure comes from the scenario runs (sampled the same way).
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.cgroup import MemoryCgroup
from lab.scenario import REPO, ScenarioEnv, dbguard_config, read_audit

from .contenders import CLK_TCK, _cpu_ticks, _status_kib

MiB = 1024 * 1024


def one(bpf: bool, idle: float, log) -> dict:
    from lab.pgcluster import PgCluster
    with MemoryCgroup(1000 * MiB) as cg, PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg) as cluster, \
            tempfile.TemporaryDirectory(prefix="dbguard-bench-cost-") as tmp:
        work = Path(tmp)
        env = ScenarioEnv(cg, cluster, work, work / "audit.jsonl", log)
        cfg = work / "dbguard.toml"
        cfg.write_text(dbguard_config(env, f"[bpf]\nenabled = {'true' if bpf else 'false'}\n"))
        out = open(work / "dbguard.out", "wb")
        t_spawn = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from dbguard.cli import main; sys.exit(main())",
                                 "run", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
        try:
            startup = None
            while time.monotonic() - t_spawn < 60 and proc.poll() is None:
                if any(r.get("action") == "start" for r in read_audit(env.audit_path)):
                    startup = time.monotonic() - t_spawn
                    break
                time.sleep(0.01)
            if startup is None:
                raise RuntimeError(f"dbguard run did not start: {(work / 'dbguard.out').read_text()[-300:]}")
            time.sleep(2.0)         # first cycles done
            t1, c1 = time.monotonic(), _cpu_ticks(proc.pid)
            time.sleep(idle)
            t2, c2 = time.monotonic(), _cpu_ticks(proc.pid)
            rec = {"startup_s": startup,
                   "cpu_idle_pct": 100.0 * (c2 - c1) / CLK_TCK / (t2 - t1) if c1 is not None and c2 is not None else None,
                   "rss_steady_mib": (_status_kib(proc.pid, "VmRSS") or 0) / 1024,
                   "rss_peak_mib": (_status_kib(proc.pid, "VmHWM") or 0) / 1024,
                   "idle_window_s": round(t2 - t1, 1)}
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            out.close()
    return rec


def run(quick: bool = False, log=print) -> dict:
    rounds, idle = (1, 10.0) if quick else (3, 20.0)
    res: dict = {"method": " ".join(__doc__.split("\n\n", 1)[1].split())
                 + f" {rounds} run(s) each, interleaved, idle window {idle:g} s."}
    for c in ("dbguard-user", "dbguard-bpf"):
        res[c] = {"runs": []}
    for _ in range(rounds):
        for c in ("dbguard-user", "dbguard-bpf"):
            try:
                r = one(c == "dbguard-bpf", idle, log)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            res[c]["runs"].append(r)
            log(f"{c}: {r}")
    return res
