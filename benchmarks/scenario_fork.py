"""Scenario 4, fork-storm: the postmaster (a protected parent) forks a backend per connection;
then 300 are opened at once and counted: how many each guard protected at birth."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab.cgroup import MemoryCgroup
from lab.pgoutput import parse_pgbench
from lab.procs import oom_score_adj
from lab.scenario import ScenarioEnv

from .contenders import Contender, Sampler, sampled
from .record import Log, Params, guard_cost, sampled_series

MiB = 1024 * 1024


HELD = 300        # backends opened at once and held for the coverage check


def _owned_map_ids(owner_pid: int) -> dict[int, str]:
    """map id -> name of the BPF maps process `owner_pid` holds open (its fdinfo says)."""
    out = {}
    fd_dir = Path(f"/proc/{owner_pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        with contextlib.suppress(OSError):
            if os.readlink(fd) != "anon_inode:bpf-map":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{owner_pid}/fdinfo/{fd.name}").read_text().splitlines() if ":" in line)
            if "map_id" in info:
                out[int(info["map_id"])] = ""
    return out


def bpf_protected(owner_pid: int) -> set[int] | None:
    """tgids with a protection flag in the `procs` BPF map that process `owner_pid` loaded, read
    with bpftool (the map is not pinned: found through the owner's open fds). None if not found."""
    from dbguard.kernel.layout import INHERIT, INHERITED, SHIELD
    ids = []
    for mid in _owned_map_ids(owner_pid):
        r = subprocess.run(["bpftool", "-j", "map", "show", "id", str(mid)], capture_output=True, text=True,
                           timeout=20)
        with contextlib.suppress(ValueError):
            if json.loads(r.stdout or "{}").get("name") == "procs":
                ids.append(mid)
    if not ids:
        return None
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(ids[0])], capture_output=True,
                         text=True, timeout=60).stdout
    mask = SHIELD | INHERIT | INHERITED
    held = set()
    for e in json.loads(out or "[]"):
        key, val = e.get("key"), e.get("value")
        if isinstance(key, list):           # raw bytes as hex strings, little endian
            tgid = int.from_bytes(bytes(int(x, 16) for x in key[:4]), "little")
            flags = int.from_bytes(bytes(int(x, 16) for x in val[:4]), "little")
        else:                               # BTF-formatted
            tgid, flags = int(key), int(val["flags"])
        if flags & mask:
            held.add(tgid)
    return held


def fork_storm(c: Contender, p: Params, log: Log) -> dict:
    import psycopg
    from lab.pgcluster import PgCluster

    sink: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-bench-fork-{c.name}-"))
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(3072 * MiB))
            cluster = stack.enter_context(PgCluster(
                settings={"shared_buffers": "64MB", "max_connections": str(HELD + 50)}, cgroup=cg))
            env = ScenarioEnv(cg, cluster, workdir, workdir / "audit.jsonl", lambda m: log(f"[{c.name}] {m}"))
            stack.enter_context(sampled(c, sink)(env))
            dsn = cluster.dsn

            # Phase 1: pgbench -C opens a new connection for every transaction (one SELECT): each
            # is a fork and an exit of a postmaster child, from a C client fast enough to load it.
            cluster.pgbench_init(1)
            t_start = time.monotonic()
            bench = cluster.pgbench("-C", "-S", "-c", "4", "-j", "2", "-T", str(p.duration), "--no-vacuum")
            out, err = bench.communicate(timeout=p.duration + 60)
            elapsed = time.monotonic() - t_start
            parsed = parse_pgbench(out or "", err or "")
            churned = parsed.transactions_ok
            errors = parsed.errors

            # Phase 2: HELD backends born at once; which are protected right away and 1.5 s later.
            t_open = time.monotonic()
            with ThreadPoolExecutor(8) as ex:
                conns = list(ex.map(lambda _: psycopg.connect(dsn, autocommit=True), range(HELD)))
            stack.callback(lambda: [cn.close() for cn in conns])
            born_in = time.monotonic() - t_open
            pids = [cn.execute("SELECT pg_backend_pid()").fetchone()[0] for cn in conns]
            sampler: Sampler | None = sink.get("sampler")
            owner = sampler.guard_pid if sampler else None
            coverage: dict = {"held": HELD, "opened_in_s": round(born_in, 3)}
            for label, wait in (("at_birth", 0.0), ("after_1_5s", 1.5)):
                time.sleep(wait)
                if c.bpf and owner:
                    held = bpf_protected(owner)
                    coverage[f"bpf_{label}"] = None if held is None else sum(1 for x in pids if x in held)
                scores = [oom_score_adj(x) for x in pids]
                coverage[f"lowered_score_{label}"] = sum(1 for s in scores if s is not None and s < 0)
            pm_score = oom_score_adj(cluster.postmaster_pid())
            return {
                "connections": churned,
                "connections_per_s": churned / p.duration,
                "connect_errors": errors[:5],
                "coverage": coverage,
                "postmaster_oom_score_adj": pm_score,
                "db_survived": cluster.is_up(),
                "samples": sampled_series(sampler, t_start),
                **guard_cost(sink, t_start, elapsed),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

