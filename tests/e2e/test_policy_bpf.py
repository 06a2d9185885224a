"""[[policy.rules]] reach the kernel: the BPF maps say what user space decided, for every process.

Real BPF (BpfGuard loaded with BCC), real processes in memory cgroups made under our own,
a real /proc snapshot, and the daemon's own sync (`Daemon._sync_bpf`). The policy mixes a
protect rule, a size rule (kill), a prefer rule, cgroup tier rules and the default; it is
also written a second way, with the same outcome: tiers given by [policy.cgroup_tiers], a
protect rule on `in_tier`, and the size rule on PSS (read from the real smaps_rollup). For
every process of the host, the user-space verdict is compared with the maps:
protected <-> SHIELD entry with its tier; in-kernel candidate <-> CANDIDATE entry with its
tier; anything else <-> no entry. As the lower band empties, the next one is listed.

Needs root, BCC and kernel headers (`make setup`); fails with the reason otherwise.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from dbguard import config
from dbguard.audit import AuditLog
from dbguard.classify import classify
from dbguard.daemon import Daemon
from dbguard.kernel.bpf import CANDIDATE, INHERITED, SHIELD
from dbguard.kernel.feed import KernelFeed
from dbguard.metrics import Metrics
from dbguard.model import MemoryReading, Snapshot
from dbguard.policy import Policy
from dbguard.sense.procfs import read_procs, read_pss
from dbguard.sensor import relative_memcg
from lab import hog
from lab.cgroup import MemoryCgroup
from lab.procs import Processes, start_time

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]

MiB = 1024**2
TIERS = ["free", "standard", "premium"]


def policy_toml(cg: str, style: str) -> dict:
    if style == "cgroup_tiers":
        return {
            "kill": {"min_rss": "16MiB", "protect_exe": []},
            "policy": {
                "tiers": TIERS,
                "default_tier": "standard",
                "cgroup_tiers": {f"{cg}/premium/*": "premium", f"{cg}/free/*": "free",
                                 f"{cg}/standard/*": "standard"},
                "rules": [
                    {"name": "vip", "in_tier": "premium", "action": "protect"},
                    {"name": "too-big", "pss_above": "6x kill.min_rss", "action": "kill"},
                    {"name": "batch", "cgroup": f"{cg}/free/batch*", "action": "prefer", "weight": 5},
                ],
            },
        }
    return {
        "kill": {"min_rss": "16MiB", "protect_exe": []},
        "policy": {
            "tiers": TIERS,
            "default_tier": "standard",
            "rules": [
                {"name": "vip", "cgroup": f"{cg}/premium/*", "action": "protect", "tier": "premium"},
                {"name": "too-big", "rss_above": "6x kill.min_rss", "action": "kill"},
                {"name": "batch", "cgroup": f"{cg}/free/batch*", "action": "prefer", "weight": 5, "tier": "free"},
                {"name": "free", "cgroup": f"{cg}/free/*", "tier": "free"},
                {"name": "standard", "cgroup": f"{cg}/standard/*", "tier": "standard"},
            ],
        },
    }


class Tenants:
    """Hogs of known sizes in sub-groups of a memory cgroup (which takes them away at its end)."""

    def __init__(self, cg: MemoryCgroup, procs: Processes):
        self.cg, self.all = cg, procs
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, rel: str, mib: int) -> subprocess.Popen:
        if mib == 0:
            # Far below kill.min_rss whatever an interpreter weighs (a Python hog alone is ~17 MiB).
            p = self.all.add(subprocess.Popen(["sleep", "600"], preexec_fn=self.cg.preexec(rel),
                                              stdout=subprocess.PIPE))
        else:
            p = self.all.add(hog.spawn(mib * MiB, 8 * MiB, 0, 600, preexec_fn=self.cg.preexec(rel),
                                       stdout=subprocess.PIPE))
        self.procs[name] = p
        return p

    def ready(self) -> None:
        for name, p in self.procs.items():
            if p.args[0] != "sleep":
                hog.wait_holding(p, f"hog {name}")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        p.kill()
        p.wait()


def _alive(pid: int, started: int) -> bool:
    return start_time(pid) == started


@pytest.mark.parametrize("style", ["rules", "cgroup_tiers"])
def test_maps_hold_the_user_space_decision_for_every_process(bpf_guard, procs, tmp_path, style):
    guard = bpf_guard
    with MemoryCgroup(2048 * MiB) as cg:
        t = Tenants(cg, procs)
        try:
            pids = {
                "vip": t.spawn("vip", "premium/a", 40).pid,
                "big": t.spawn("big", "standard/b", 150).pid,       # size rule: kill, whatever the tier
                "batch": t.spawn("batch", "free/batch1", 30).pid,   # prefer, weight 5, tier free
                "free1": t.spawn("free1", "free/t1", 40).pid,
                "free2": t.spawn("free2", "free/t2", 24).pid,
                "std": t.spawn("std", "standard/a", 60).pid,
                "tiny": t.spawn("tiny", "standard/c", 0).pid,       # below kill.min_rss: left alone
            }
            t.ready()
            cfg = config.from_dict(policy_toml(cg.relpath, style))
            assert not cfg.warnings
            pol = Policy(cfg, watched_memcg=cg.relpath, pss_reader=read_pss)
            daemon = Daemon(cfg)
            daemon.bpf = guard
            daemon.feed = KernelFeed(guard, cfg, [str(cg.path)])     # the kernel's own kills: this cgroup only
            daemon.audit = AuditLog(str(tmp_path / "audit.jsonl"))
            daemon.metrics = Metrics("")
            reading = MemoryReading(cgroup=str(cg.path), cgroup_version=cg.version, usage_bytes=cg.usage(),
                                    limit_bytes=cg.limit_bytes, psi_some_avg10=0.0, psi_full_avg10=0.0)
            assert relative_memcg(str(cg.path)) == cg.relpath

            def sync_and_compare() -> dict[int, str]:
                procs = read_procs()
                snap = Snapshot(ts=time.time(), memory=reading, procs=procs,
                                roles=classify(procs, [], os.getpid()), databases=(), self_pid=os.getpid())
                daemon._sync_bpf([(pol, snap)])        # at rest (no scope pressed): nothing may be killed meanwhile
                protected, candidates = guard.protected_tgids(), guard.candidate_tgids()
                view = pol.kernel_view(snap)
                got: dict[int, str] = {}
                compared = 0
                for pid, proc in snap.procs.items():
                    v = pol.verdicts(snap)[pid]      # what the maps were compiled from (PSS read once)
                    if not _alive(pid, proc.start_time):
                        continue          # gone since the snapshot: the exit hook removed it
                    compared += 1
                    if proc.kernel_thread:
                        assert pid not in protected and pid not in candidates
                        continue
                    if v.protected:
                        flags, tier = protected.get(pid, (0, None))
                        assert flags & SHIELD and tier == v.tier_rank, (pid, proc.comm, v, flags, tier)
                        assert pid not in candidates
                        got[pid] = f"shield:{v.tier}"
                    elif pid in view.candidates:
                        assert v.candidate
                        assert candidates.get(pid) == v.tier_rank, (pid, proc.comm, v)
                        assert pid not in protected
                        got[pid] = f"candidate:{v.tier}"
                    else:
                        # Not listed: left alone, or a candidate of a later band. Inherited
                        # entries (children of a protected parent) belong to the kernel.
                        flags = protected.get(pid, (0, 0))[0]
                        assert pid not in candidates and (pid not in protected or flags & INHERITED), \
                            (pid, proc.comm, v)
                        got[pid] = "candidate-later" if v.candidate else "none"
                # and nothing in the maps that user space did not put there
                raw = {k.value: v.flags for k, v in guard._procs.items()}
                for pid, flags in raw.items():
                    if flags & CANDIDATE:
                        assert pid in view.candidates
                    elif not flags & INHERITED and pid in snap.procs:
                        assert pid in view.protected
                assert compared > 20, "the host's whole process table is compared"
                return got

            def mine(got: dict[int, str]) -> dict[str, str]:
                return {name: got.get(pid, "gone") for name, pid in pids.items() if pid in got}

            got = sync_and_compare()
            assert mine(got) == {
                "vip": "shield:premium", "big": "candidate:standard", "batch": "candidate:free",
                "free1": "candidate-later", "free2": "candidate-later", "std": "candidate-later", "tiny": "none"}
            assert got[os.getpid()] == "shield:standard", "dbguard itself is shielded"
            assert got.get(1, "").startswith("shield"), "PID 1 is shielded"

            # the prefer band gone: the free tier is next; then the standard tier
            t.stop("batch")
            got = sync_and_compare()
            assert mine(got) == {
                "vip": "shield:premium", "big": "candidate:standard", "free1": "candidate:free",
                "free2": "candidate:free", "std": "candidate-later", "tiny": "none"}
            t.stop("free1")
            t.stop("free2")
            t.stop("big")
            got = sync_and_compare()
            assert mine(got) == {"vip": "shield:premium", "std": "candidate:standard", "tiny": "none"}
        finally:
            procs.close()
            guard.sync_processes({}, {})
            guard.set_scope(None, unlisted=False)
            guard.set_policy(level=0, enabled=False, dry_run=False)
