"""A database's helpers are never kill candidates (issue #11): a `COPY ... TO PROGRAM` child of
a backend and an `archive_command` child of the archiver, each holding 120 MiB, next to three
ordinary 150 MiB hogs in a 700 MiB memory cgroup with PostgreSQL.

`dbguard explain --pid` calls both helpers protected (role db_child), and under real pressure
`dbguard run` kills only the ordinary hogs: both helpers outlive the pressure, no audit record
names them, their score was never raised, and the kernel killed nobody.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dbguard.sense.procfs import read_procs
from lab import hog
from lab.launcher import REPO, DbguardRun, audit_names, base_config, dbguard_command, toml
from lab.procs import alive

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]

MiB = 1024 * 1024
HELD = 120       # MiB each helper holds
# A helper that holds memory: what pg_dump | gzip, a backup tool or a slow archive copy does.
HOLDER = f"""#!/bin/sh
exec python3 -c 'import sys, time
b = bytearray({HELD} << 20)
b[::4096] = b"x" * len(range(0, len(b), 4096))
sys.stdin.read() if sys.argv[1] == "copy" else None
time.sleep(45)' "$1"
"""


def _helpers(postmaster: int) -> dict[str, int]:
    """The COPY and archive helpers below the postmaster, by what their shell was given."""
    procs = read_procs()
    below, found = {postmaster}, {}
    changed = True
    while changed:
        changed = False
        for pid, p in procs.items():
            if p.ppid in below and pid not in below:
                below.add(pid)
                changed = True
    for pid in below:
        p = procs[pid]
        if p.comm.startswith("python") and p.rss_bytes >= (HELD - 8) * MiB:
            found["copy" if p.cmdline.endswith(" copy") else "archive"] = pid
    return found


# How psql's COPY may end once the test stops the server under it (pg_ctl fast, then immediate,
# then the cluster's leftovers killed, the helper among them): any other ending is a failure.
STOPPED = re.compile(r"terminating connection due to (administrator|immediate shutdown) command"
                     r"|server closed the connection unexpectedly"
                     r"|program .* failed.*terminated by signal", re.S)


class Copy(threading.Thread):
    """`COPY ... TO PROGRAM` through psql: it runs until its helper ends (45 s) or the server
    stops; how it ended is kept (`error`, None: it finished), never raised in the thread."""

    def __init__(self, cluster, holder: Path):
        super().__init__(daemon=True)
        self.cluster, self.holder = cluster, holder
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.cluster.psql(f"COPY (SELECT 1) TO PROGRAM '{self.holder} copy'")
        except Exception as e:         # kept for the test to judge, with the server's own words
            self.error = f"{type(e).__name__}: {e}"


@pytest.fixture
def procs_cleanup():
    undo: list = []
    yield undo
    for fn in undo:
        fn()


def test_copy_program_and_archive_command_children_are_never_killed(postgresql_host, make_cgroup, procs, tmp_path,
                                                                      procs_cleanup):
    from lab.pgcluster import PgCluster
    # Where the postgres OS user can run it (pytest's tmp_path is under a root-only directory).
    where = Path(tempfile.mkdtemp(prefix="dbguard-helper-"))
    procs_cleanup.append(lambda: shutil.rmtree(where, ignore_errors=True))
    os.chmod(where, 0o755)
    holder = where / "holder.sh"
    holder.write_text(HOLDER)
    holder.chmod(0o755)
    cg = make_cgroup(4096 * MiB)
    with PgCluster(settings={"shared_buffers": "64MB", "archive_mode": "on", "wal_level": "replica",
                             "archive_command": f"{holder} archive", "archive_timeout": "0"}, cgroup=cg) as c:
        pm = c.postmaster_pid()
        copy = Copy(c, holder)
        copy.start()
        c.psql("CREATE TABLE w AS SELECT g FROM generate_series(1, 100000) g; SELECT pg_switch_wal()")
        deadline = time.monotonic() + 30
        found: dict[str, int] = {}
        while time.monotonic() < deadline and len(found) < 2:
            found = _helpers(pm)
            time.sleep(0.2)
        assert set(found) == {"copy", "archive"}, f"helpers not running: {found}"

        work = tmp_path / "dbguard"
        work.mkdir()
        cfg = base_config(work, cg.path)
        cfg["databases"] = [{"name": "fam", "kind": "postgresql", "dsn": c.dsn}]
        (work / "explain.toml").write_text(toml(cfg))
        for what, pid in found.items():
            out = subprocess.run(dbguard_command("explain", "--config", str(work / "explain.toml"), "--pid", str(pid)),
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert f"pid {pid}" in out.stdout and ": protected" in out.stdout and "role db_child" in out.stdout, \
                (what, out.stdout)

        cg.set_limit(700 * MiB)
        run = DbguardRun(work, cfg)
        try:
            run.wait_protecting(settle=1.0)
            hogs = [procs.add(hog.spawn(150 * MiB, 5 * MiB, 0.05, hold=60, preexec_fn=cg.preexec(),
                                        stdout=subprocess.DEVNULL)) for _ in range(3)]
            time.sleep(15)        # the hogs grow in ~1.5 s; the pressure is answered (or not) by then
            audit = run.audit()
            story = "\naudit:\n" + "\n".join(json.dumps(r) for r in audit[-40:]) + "\n" + run.output(3000)
            assert run.running(), "dbguard stopped" + story
            killed = [h.pid for h in hogs if h.poll() == -signal.SIGKILL]
            assert killed, "no hog was killed: no pressure?" + story
            for pid in killed:
                assert any(r["action"] == "kill" and audit_names(r, pid) for r in audit), pid
            for what, pid in found.items():
                assert alive(pid), f"the {what} helper (pid {pid}) died" + story
                assert not [r for r in audit if audit_names(r, pid)], f"dbguard acted on the {what} helper" + story
                with open(f"/proc/{pid}/oom_score_adj") as f:
                    assert int(f.read()) <= 0, f"the {what} helper's score was raised" + story
            assert cg.oom_kills() == 0, "the kernel OOM killer acted" + story
            assert alive(pm) and c.is_up()
            print(f"helpers {found} alive; hogs killed by dbguard: {killed}; kernel OOM kills: {cg.oom_kills()}")
        finally:
            run.stop(15)
            for h in hogs if "hogs" in locals() else ():
                h.kill()
        assert copy.is_alive(), f"the COPY ended before the server was stopped: {copy.error}"
    # (the helpers end with the server: the archiver would run a killed archive_command again)
    copy.join(60)
    assert not copy.is_alive(), "the COPY's psql still runs after the server stopped"
    assert copy.error is None or STOPPED.search(copy.error), f"the COPY failed otherwise: {copy.error}"
    print(f"the COPY ended with the server: {copy.error or 'finished'}")
