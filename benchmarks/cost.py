"""dbguard's own cost: startup to "protecting" and to "kernel path attached", CPU at idle, RSS
steady and at its peak.

`dbguard run` is started as a subprocess (as lab.scenario.dbguard_guard does) watching an
idle throwaway PostgreSQL in a 1000 MB memory cgroup. Startup to "protecting": from spawn to
its "start" audit record (written once the config is loaded, the database reached and memory
locked: the user-space path protects from then on, whether the BPF programs are ready or not);
to "kernel path attached" (BPF path): from spawn to its "bpf_attached" record (the programs,
compiled or loaded in the loader child beside the start, attached by the next cycle). A first
start has an empty state directory, so the BPF programs are compiled; restart (BPF path): the
same once more after a stop, in the same state directory, where the first start kept the
compiled programs (dbguard/kernel/objcache.py: loaded, verified by the kernel and attached
without clang). Idle CPU: utime+stime over the
idle window after that. RSS steady: VmRSS at the end; peak: VmHWM. BCC compiles in a short-lived
child (dbguard/kernel/loader.py) that is not in these figures: its own peak RSS and lifetime are
measured apart (the child alone, started as the daemon starts it). CPU under pressure comes from the scenario runs (sampled the same way). The idle
case is measured as the host is and with 5,000 extra sleeping processes (benchmarks.scale's
spawner): the cost at rest must not grow with what merely exists. dbguard's modules are compiled
to bytecode first, as installing it does (compile_bytecode).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun
from lab.procs import CLK_TCK, cpu_ticks, status_kib
from lab.scenario import ScenarioEnv, dbguard_config

from .rss import by_mapping

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


EXTRA = (0, 5000)


def one(bpf: bool, idle: float, log, extra: int = 0) -> dict:
    from lab.pgcluster import PgCluster

    from .scale import sleepers
    with sleepers(extra) if extra else contextlib.nullcontext(), MemoryCgroup(1000 * MiB) as cg, PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg) as cluster, \
            tempfile.TemporaryDirectory(prefix="dbguard-bench-cost-") as tmp:
        work = Path(tmp)
        env = ScenarioEnv(cg, cluster, work, work / "audit.jsonl", log)
        cfg = dbguard_config(env, {"bpf": {"enabled": bpf}})
        with DbguardRun(work, cfg) as run:
            startup = run.wait_protecting(poll=0.01, kernel=False)
            attached = kernel_path(run, cached=False) if bpf else None
            time.sleep(2.0)         # first cycles done
            t1, c1 = time.monotonic(), cpu_ticks(run.pid)
            time.sleep(idle)
            t2, c2 = time.monotonic(), cpu_ticks(run.pid)
            rss = {k: status_kib(run.pid, k) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
            smaps = _read(f"/proc/{run.pid}/smaps")
            if not run.running() or None in rss.values():
                # Never a zero in the table for a guard that was not there to be measured.
                raise RuntimeError(f"dbguard exited during the idle window (code {run.returncode}): "
                                   f"{run.tail(3) or 'no output'}")
            out = {"startup_s": startup, "attached_s": attached,
                   "cpu_idle_pct": 100.0 * (c2 - c1) / CLK_TCK / (t2 - t1) if c1 is not None and c2 is not None
                   else None,
                   "rss_steady_mib": rss["VmRSS"] / 1024,
                   "rss_peak_mib": rss["VmHWM"] / 1024,
                   "rss_anon_mib": rss["RssAnon"] / 1024,
                   "rss_file_mib": rss["RssFile"] / 1024,
                   "rss_by_mapping_mib": by_mapping(smaps) if smaps else None,
                   "extra_processes": extra,
                   "idle_window_s": round(t2 - t1, 1)}
        if bpf:
            out["restart_s"], out["restart_attached_s"] = restart(work, cfg)
        return out


def kernel_path(run: DbguardRun, cached: bool) -> float:
    """Seconds from spawn to the "bpf_attached" record; raises when the kernel path failed, or
    when it was (not) loaded from the compile cache against `cached`, so that no compile is
    counted as a restart nor a restart as a compile."""
    seconds, rec = run.wait_kernel_path(timeout=120, poll=0.01)
    if rec["action"] != "bpf_attached" or rec.get("from_cache") is not cached:
        raise RuntimeError(f"the kernel path was not attached {'from the compile cache' if cached else 'by a compile'}: "
                           f"{str(rec)[:200]}")
    return seconds


def restart(work: Path, cfg: dict) -> tuple[float, float]:
    """A second start in the same state directory, the first one stopped: the programs its
    compile kept are loaded (kernel.objcache); seconds to "protecting" and to "kernel path
    attached"."""
    cfg = {**cfg, "audit": {**cfg["audit"], "path": str(work / "audit-restart.jsonl")}}
    with DbguardRun(work, cfg) as run:
        seconds = run.wait_protecting(poll=0.01, kernel=False)
        return seconds, kernel_path(run, cached=True)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:         # gone: the check below says so
        return None


# What the RSS is made of: a fresh interpreter after each step's imports (cumulative).
IMPORT_STEPS = (("python alone", ""),
                ("+ dbguard's daemon and command line (its modules, tomllib, ctypes, argparse, ...)",
                 "import dbguard.cli, dbguard.daemon"),
                ("+ psycopg, tenacity and dbguard's PostgreSQL modules (a PostgreSQL configured; as "
                 "dbguard.databases.postgresql.driver imports psycopg: without Python's ssl module and asyncio)",
                 "import dbguard.databases.postgresql.adapter"),
                ("+ PyMySQL (a MariaDB or MySQL configured; it loads Python's ssl module, libssl and libcrypto)",
                 "import pymysql"),
                ("+ libbpf (the BPF path's maps)", "import dbguard.kernel.maps as m; m.libbpf()"))
RSS_NOW = ("import sys\nf = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
           "sys.stdout.write(f['VmRSS'].split()[0] + ' ' + f['RssAnon'].split()[0])")


# The .deb's psycopg: Debian's python3-psycopg has no C wrapper of libpq but its pure-Python one
# (ctypes over the system's libpq5); the venv above has psycopg-binary's.
DEB_PSYCOPG = {"PSYCOPG_IMPL": "python"}


def _fresh_rss(code: str, env: dict | None = None, cwd: Path = REPO) -> dict:
    """VmRSS and RssAnon in MiB of a fresh interpreter that ran `code` in `cwd` (median of 3)."""
    import statistics
    import subprocess
    import sys
    runs = [subprocess.run([sys.executable, "-c", code + "\n" + RSS_NOW], capture_output=True, text=True, check=True,
                           cwd=cwd, env={**os.environ, **(env or {})}).stdout.split()
            for _ in range(3)]
    return {"rss_mib": statistics.median(int(r[0]) for r in runs) / 1024,
            "anon_mib": statistics.median(int(r[1]) for r in runs) / 1024}


def imports() -> list[dict]:
    """RSS and its anonymous part after each of IMPORT_STEPS (median of 3 fresh interpreters)."""
    out, code = [], []
    for label, stmt in IMPORT_STEPS:
        code.append(stmt)
        out.append({"step": label, **_fresh_rss("\n".join(filter(None, code)))})
    return out


def _upto_psycopg() -> str:
    """The code of IMPORT_STEPS up to psycopg's step, in one."""
    upto = next(i for i, (label, _) in enumerate(IMPORT_STEPS) if label.startswith("+ psycopg"))
    return "\n".join(filter(None, (stmt for _, stmt in IMPORT_STEPS[:upto + 1])))


def imports_deb() -> dict:
    """The daemon's imports up to psycopg's step, with the .deb's psycopg (DEB_PSYCOPG)."""
    code = _upto_psycopg() + "\nimport psycopg\nassert psycopg.pq.__impl__ == 'python', psycopg.pq.__impl__"
    return _fresh_rss(code, DEB_PSYCOPG)


def imports_asyncio() -> dict:
    """The daemon's imports up to psycopg's step, and asyncio as psycopg and tenacity would load
    it without dbguard.lean's stand-in (without ssl, as the stand-in's fallback loads it)."""
    return _fresh_rss(_upto_psycopg() + "\nimport sys\nfrom dbguard import lean\nwith lean.absent('ssl'):\n"
                      "    import asyncio\nassert 'ssl' not in sys.modules")


def compile_bytecode() -> None:
    """dbguard's modules compiled to bytecode beside them, as an install does (pip; the .deb's
    postinst runs py3compile), so that what is measured is an installed dbguard's start. A
    checkout without it, run where PYTHONDONTWRITEBYTECODE=1 (this lab's shell), compiles every
    module from source at every start (imports_from_source says what that costs)."""
    import compileall
    if not compileall.compile_dir(REPO / "dbguard", quiet=1):
        raise RuntimeError("python -m compileall dbguard failed: the modules do not compile")


def imports_from_source() -> dict:
    """The daemon's imports up to psycopg's step with dbguard's modules compiled from source at
    import (no bytecode): how the runs before 2026-12-02 started (see compile_bytecode)."""
    import shutil
    with tempfile.TemporaryDirectory(prefix="dbguard-bench-nopyc-") as tree:
        shutil.copytree(REPO / "dbguard", Path(tree) / "dbguard", ignore=shutil.ignore_patterns("__pycache__"))
        code = _upto_psycopg() + "\nimport dbguard\nassert dbguard.__file__.startswith(%r)" % tree
        return _fresh_rss(code, {"PYTHONDONTWRITEBYTECODE": "1"}, cwd=Path(tree))


def procfs_reference(passes: int = 5) -> dict:
    """How fast this machine reads /proc at the time of the run: microseconds per process of
    dbguard's full read of the host's /proc (sense.procfs.read_procs, median of `passes`). The
    CPU at rest is mostly such reads (the sweep, the largest each cycle), so the same code costs
    more CPU where they are slower: this puts runs on different machines or boots side by side."""
    import statistics

    from dbguard.sense.procfs import read_procs
    per, n = [], 0
    for _ in range(passes):
        t = time.perf_counter()
        n = len(read_procs())
        per.append((time.perf_counter() - t) / max(n, 1))
    return {"us_per_process": statistics.median(per) * 1e6, "processes": n}


def _child(cache_dir: str = "") -> tuple[float, float, str]:
    """(peak RSS in MiB: VmHWM sampled every 10 ms, seconds, the loader's cache note) of one loader child."""
    from dbguard.kernel.loader import Loading
    t = time.monotonic()
    loading = Loading(16384, 1024, cache_dir)
    pid, peak = loading._proc.pid, 0
    while loading._proc.poll() is None:
        peak = max(peak, status_kib(pid, "VmHWM") or 0)
        time.sleep(0.01)
    _, desc, fds = loading.result()
    seconds = time.monotonic() - t
    for fd in fds:
        os.close(fd)
    return peak / 1024, seconds, desc.get("cache", "")


def compile_child() -> dict:
    """The BPF loader child's peak RSS and lifetime: compiling, then loading what that compile
    kept (kernel.objcache) as a restart does."""
    from dbguard.kernel.loader import FROM_CACHE
    with tempfile.TemporaryDirectory(prefix="dbguard-bench-objcache-") as tmp:
        peak, seconds, _ = _child(os.path.join(tmp, "bpf"))
        cached_peak, cached_seconds, note = _child(os.path.join(tmp, "bpf"))
    if not note.startswith(FROM_CACHE):
        raise RuntimeError(f"the second child did not load the kept programs: {note[:200]}")
    return {"peak_mib": peak, "seconds": seconds, "cached_peak_mib": cached_peak, "cached_seconds": cached_seconds}


def run(quick: bool = False, log=print) -> dict:
    rounds, idle = (1, 10.0) if quick else (3, 20.0)
    res: dict = {"method": " ".join(__doc__.split("\n\n", 1)[1].split())
                 + f" {rounds} run(s) each, interleaved, idle window {idle:g} s."}
    for c in ("dbguard-user", "dbguard-bpf"):
        res[c] = {"runs": []}
    compile_bytecode()
    res["procfs_reference"] = procfs_reference()
    log(f"procfs reference: {res['procfs_reference']}")
    for key, measure, what in (("imports_from_source", imports_from_source, "imports compiled from source"),
                               ("imports", imports, "imports"),
                               ("imports_deb", imports_deb, "imports with the .deb's psycopg"),
                               ("imports_asyncio", imports_asyncio, "imports with asyncio")):
        try:
            res[key] = measure()
        except Exception as e:
            res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"{what}: {res[key]}")
    res["compile_child"] = []
    for _ in range(rounds):
        try:
            res["compile_child"].append(compile_child())
        except Exception as e:
            res["compile_child"].append({"error": f"{type(e).__name__}: {e}"[:300]})
        log(f"compile child: {res['compile_child'][-1]}")
        for extra in EXTRA:
            for c in ("dbguard-user", "dbguard-bpf"):
                try:
                    r = one(c == "dbguard-bpf", idle, log, extra)
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"[:300], "extra_processes": extra}
                res[c]["runs"].append(r)
                log(f"{c} +{extra}: {r}")
    return res
