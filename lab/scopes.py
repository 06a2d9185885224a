"""Pressure in one scope among several (tests/e2e/test_scopes_*.py): pods each in a memory
cgroup of its own, one `dbguard run` watching each pod's cgroup as its own scope.

    hogs, began = press(daemon, cg, procs, "pod-a")   # hogs beside pod-a: its caches shrunk, a hog killed
    settle(daemon, hogs, str(cg.path))                # the hogs gone, that scope back at ok
    bpf_scope_ids(daemon.pid)                         # the memcg ids in the daemon's BPF scope set
    shut_down(daemon, pods.values())                  # dbguard stopped, then the pods (in a finally:)
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from dbguard.errors import DbguardError
from lab import hog
from lab.launcher import DbguardRun
from lab.procs import wait_until

MiB = 1024**2
ANSWERS = ("kill", "shrink_cache", "cancel_query", "terminate_session", "set_oom_score_adj", "level_change")


def shut_down(daemon: DbguardRun | None, servers) -> None:
    """At a test's end, whatever happened: dbguard stopped first (an error stopping it does not
    hide the test's own), then each pod or server destroyed."""
    if daemon is not None:
        with contextlib.suppress(DbguardError):
            daemon.stop()
    for server in servers:
        server.destroy()


def pressure_answer(r: dict) -> bool:
    """An answer to pressure: not the shield every new database process gets at rest (its
    score lowered), which another pod's autovacuum workers may get while one pod is pressed."""
    return r.get("action") in ANSWERS and not (r["action"] == "set_oom_score_adj" and r.get("value", 0) <= 0)


def warn_hog(cg) -> int:
    """A hog's size that takes `cg`'s memory that no reclaim frees (usage less page cache; shared
    memory counts: without swap it stays) to 85 % of its limit: between the warn (80 %) and
    high (90 %) marks, whatever the database beside it already holds (a MariaDB's is larger
    than a PostgreSQL's)."""
    return max(8 * MiB, int(cg.limit_bytes * 0.85) - cg.unreclaimable())


def press(daemon: DbguardRun, cg, procs, name: str) -> tuple[list, float]:
    """Hogs beside database `name` in `cg`: one that takes it between the warn and high marks
    (warn_hog: the database's caches are answered; on cgroup v1 a scope of several is judged by its usage, the host's
    PSI being everyone's), then one that would pass it (a kill). Returns the hogs and the
    time pressure began."""
    began = time.time()
    steady = procs.add(hog.spawn(warn_hog(cg), 8 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                 stdout=subprocess.DEVNULL))
    daemon.wait_record(lambda r: r.get("action") == "shrink_cache" and r.get("database") == name, 90,
                       f"{name}'s cache shrunk")
    big = procs.add(hog.spawn(2 * cg.limit_bytes, 10 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                              stdout=subprocess.DEVNULL))
    assert wait_until(lambda: big.poll() is not None, 60), f"the hog in {name} was never killed: {daemon.audit()[-5:]}"
    return [steady, big], began


def settle(daemon: DbguardRun, hogs: list, scope: str) -> None:
    """The hogs gone, and the scope back at ok (its caches may grow back meanwhile)."""
    for h in hogs:
        if h.poll() is None:
            h.kill()
            h.wait(10)

    def at_ok() -> bool:
        changes = [r for r in daemon.audit() if r.get("action") == "level_change" and r.get("scope") == scope]
        return bool(changes) and changes[-1]["result"].endswith("-> ok")
    daemon.wait_for(at_ok, 90, f"{scope} back at ok")


def bpf_map_ids(pid: int) -> list[int]:
    """Ids of the BPF maps process `pid` holds open (its descriptors' fdinfo: the kernel's word)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "anon_inode:bpf-map":
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                out += [int(ln.split()[1]) for ln in info.splitlines() if ln.startswith("map_id:")]
    return out


def _bpftool(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)


def bpf_scope_ids(pid: int) -> set[int]:
    """The keys (memcg ids) of the `scopes` map that process `pid` holds, as bpftool reads it
    (empty when it holds none)."""
    mine = [i for i in bpf_map_ids(pid) if _bpftool("map", "show", "id", str(i)).get("name") == "scopes"]
    if len(mine) != 1:      # none: its BPF not loaded, or it exited (the caller's wait says which)
        return set()
    out = set()
    for e in _bpftool("map", "dump", "id", str(mine[0])):
        key = e["formatted"]["key"] if "formatted" in e else e["key"]
        out.add(key if isinstance(key, int) else int.from_bytes(bytes(int(b, 16) for b in key), "little"))
    return out
