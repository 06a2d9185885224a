"""Under pressure the process table reads a known process only for what can change (its
memory, score and owner), yet the victim must be the one a full read would choose: real
processes of known sizes in a memory cgroup, grown, moved out of the scope and moved within
it, and after each change the policy's first kill candidate compared with the largest process
the test itself finds listed in the cgroup's cgroup.procs files, by /proc/PID/statm
(lab.procs.rss), never through dbguard's table."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

from dbguard import config
from dbguard.sense.proctable import YOUNG_SECONDS
from dbguard.sensor import Sensor
from dbguard.watch import build_policies
from lab import procs as lp
from lab import require
from lab.cgroup import MemoryCgroup

MiB = 1024 * 1024

# Holds what it is told to (MiB, one line each), every page written, and says so.
HOLDER = ("import sys\nheld = []\nfor line in sys.stdin:\n"
          "    held.append(bytearray(b'\\x01' * (int(line) << 20)))\n    print('ok', flush=True)\n")


def _grow(p: subprocess.Popen, mib: int) -> None:
    p.stdin.write(f"{mib}\n")
    p.stdin.flush()
    assert p.stdout.readline() == "ok\n"


def _largest_listed(cgroup_dir: str) -> int:
    """The oracle: the largest process listed in the cgroup or below, by statm (ties: lower pid)."""
    pids = []
    for d, _, files in os.walk(cgroup_dir):
        if "cgroup.procs" in files:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
    return min(pids, key=lambda pid: (-lp.rss(pid), pid))


@pytest.fixture
def scope():
    require.memory_cgroups()
    with MemoryCgroup(4096 * MiB) as cg, MemoryCgroup(1024 * MiB) as outside, \
            tempfile.TemporaryDirectory(prefix="dbguard-test-victim-") as tmp:
        holders = []
        try:
            for i, mib in enumerate((40, 60, 80, 100, 120)):
                p = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, preexec_fn=cg.preexec("inner" if i == 1 else None))
                holders.append(p)
                _grow(p, mib)
            # Older than "young" when first read, so that nothing but what is tested reads them in full again.
            time.sleep(YOUNG_SECONDS)
            cfg = config.from_dict({"general": {"state_dir": tmp, "dry_run": True, "discover": False},
                                    "pressure": {"cgroup": str(cg.path)}, "bpf": {"enabled": False},
                                    "audit": {"path": os.path.join(tmp, "audit.jsonl")}, "metrics": {"listen": ""}})
            sensor = Sensor(cfg)
            try:
                sensor.open_pressure(sensor.collect())
                build_policies(cfg, sensor.watches, sensor.db_configs, True)
                # Neither the largest nor the slow sweep read in full: only what the scope's
                # rereads and the cgroup listings see.
                sensor.table.top, sensor.table.sweep_seconds = 0, 1e9
                yield cg, outside, holders, sensor
            finally:
                sensor.close()
        finally:
            lp.stop_all(holders)


def _victim(sensor: Sensor) -> int:
    snap = sensor.snapshot(fresh=True)
    return sensor.watches[0].policy.candidates(snap)[0].pid


def test_the_victim_is_the_largest_a_full_read_finds(scope):
    cg, outside, holders, sensor = scope
    assert _victim(sensor) == _largest_listed(str(cg.path)) == holders[4].pid
    known = sensor.table.procs[holders[0].pid]
    assert _victim(sensor) == holders[4].pid and sensor.table.procs[holders[0].pid] is known   # read, unchanged

    _grow(holders[0], 150)                      # the smallest, known since birth, now the largest
    assert _victim(sensor) == _largest_listed(str(cg.path)) == holders[0].pid
    assert sensor.table.procs[holders[0].pid].rss_bytes == lp.rss(holders[0].pid) > known.rss_bytes

    outside.add(holders[0].pid)                 # moved out of the scope: no longer a candidate there
    assert _victim(sensor) == _largest_listed(str(cg.path)) == holders[4].pid
    assert sensor.table.procs[holders[0].pid].memcg == outside.relpath

    (cg.path / "inner" / "cgroup.procs").write_text(str(holders[4].pid))      # moved within it
    assert _victim(sensor) == _largest_listed(str(cg.path)) == holders[4].pid
    assert sensor.table.procs[holders[4].pid].memcg == cg.relpath + "/inner"

    holders[4].kill()
    holders[4].wait()
    assert _victim(sensor) == _largest_listed(str(cg.path)) == holders[3].pid
