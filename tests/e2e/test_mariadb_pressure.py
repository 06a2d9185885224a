"""MariaDB under memory pressure with `dbguard run` watching its memory cgroup.

MariaDB (buffer pool 256 MiB, filled by a read workload) and two hogs share a 600 MiB
memory cgroup. Without dbguard the kernel OOM killer picks mariadbd (measured: it is the
largest process; the server dies, every session is lost, the hogs live on). With dbguard:

1. hog A grows to 160 MiB: usage passes the warn mark, dbguard shrinks the buffer pool;
2. hog B grows towards 300 MiB: shrinking is not enough, dbguard kills a hog;
3. the test ends hog A itself; with the hogs gone dbguard grows the pool back, step by
   step, to the DBA's 256 MiB.

Asserted from the audit log (JSON lines: ts, action, target, reason, level, result) and
from the server: the pool shrank before any kill, mariadbd was never killed (same pid, no
kernel OOM kill), the workload saw no errors, the pool is back at its configured size.
The timeline is printed (pytest -s shows it; it is in the failure report otherwise).
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

import pymysql
import pytest

from dbguard.errors import DbguardError
from lab import hog, pace
from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun, audit_names, audit_records, base_config
from lab.mariadb import MariaDB, ReadLoad, load_table
from lab.procs import alive, rss

MiB = 1024**2
POOL = 256 * MiB
FLOOR = 64 * MiB
LIMIT = 600 * MiB
ROWS = 1_000_000            # ~330 MiB of pages: more than the pool holds

pytestmark = [pytest.mark.e2e, pytest.mark.db, pytest.mark.root]


class Timeline(threading.Thread):
    """Samples the cgroup and the pool every 0.1 s and notes every change worth a line."""

    def __init__(self, cg: MemoryCgroup, db: MariaDB):
        super().__init__(daemon=True)
        self.cg, self.db, self.t0 = cg, db, time.time()
        self.lines: list[tuple[float, str]] = []
        self.pools: list[tuple[float, int]] = []
        self.watched: dict[int, str] = {}
        self.done = threading.Event()

    def note(self, what: str, ts: float | None = None) -> None:
        self.lines.append(((ts or time.time()) - self.t0, what))

    def run(self) -> None:
        conn = self.db.connect(read_timeout=10)
        last_pool, last_oom, peak = None, 0, 0
        try:
            while not self.done.wait(0.1):
                usage = self.cg.usage()
                peak = max(peak, usage)
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT @@GLOBAL.innodb_buffer_pool_size")
                        pool = int(cur.fetchone()[0])
                except pymysql.err.MySQLError as e:
                    self.note(f"pool unreadable: {e}")
                    return
                if pool != last_pool:
                    self.pools.append((time.time(), pool))
                    self.note(f"pool {pool // MiB} MiB (cgroup usage {usage // MiB} MiB)")
                    last_pool = pool
                oom = self.cg.oom_kills()
                if oom != last_oom:
                    self.note(f"kernel OOM kill in the cgroup (total {oom})")
                    last_oom = oom
                for pid, label in list(self.watched.items()):
                    if not alive(pid):
                        self.note(f"{label} gone (cgroup usage {usage // MiB} MiB)")
                        del self.watched[pid]
        finally:
            conn.close()
            self.note(f"peak cgroup usage {peak // MiB} MiB of {LIMIT // MiB} MiB")

    def render(self, audit: list[dict]) -> str:
        rows = list(self.lines)
        for r in audit:
            if r.get("action") in (None, "set_oom_score_adj"):
                continue
            rows.append((float(r.get("ts", self.t0)) - self.t0,
                         f"audit: {r.get('action')} {r.get('target', '')} level={r.get('level')} "
                         f"result={r.get('result')} ({r.get('reason', '')})"))
        return "\n".join(f"{t:+8.2f}s  {what}" for t, what in sorted(rows, key=lambda x: x[0]))


def _wait(cond, timeout: float, what: str, diag) -> None:
    timeout = pace.bound(timeout)       # a bound, stretched where the machine is slower (the test VM)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s\n{diag()}")
        time.sleep(0.1)


def _config(cg: MemoryCgroup, db: MariaDB, work: Path) -> dict:
    pw = work / "mysql.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = base_config(work, cg.path)
    cfg["general"]["interval"] = 0.2
    cfg["databases"] = [{"name": "e2e", "kind": "mysql", "socket": db.socket, "user": "dbguard",
                         "password_file": str(pw), "buffer_pool_floor": FLOOR, "shrink_steps": 3}]
    cfg["pressure"]["min_dwell"] = 2.0
    return cfg


def _pool(db: MariaDB) -> int:
    return int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size"))


def _kills(audit: list[dict]) -> list[dict]:
    """dbguard's kills (user space or in kernel) and audited kernel OOM kills."""
    return [r for r in audit if "kill" in str(r.get("action", ""))]


def _shrinks(audit: list[dict]) -> list[dict]:
    return [r for r in audit if r.get("action") == "shrink_cache"]


def test_mariadb_pool_shrinks_before_kills_and_grows_back(tmp_path, mariadb_host, procs):
    audit_path = tmp_path / "audit.jsonl"
    hogs: list[subprocess.Popen] = []
    daemon: DbguardRun | None = None
    timeline: Timeline | None = None
    with MemoryCgroup(2048 * MiB) as cg, MariaDB(settings={"innodb_buffer_pool_size": "256M"}, cgroup=cg) as db:
        try:
            load_table(db, ROWS)
            db.grant_dbguard("s3cret")
            cg.set_limit(LIMIT)
            mysqld = db.pid()
            timeline = Timeline(cg, db)
            timeline.watched[mysqld] = f"mariadbd (pid {mysqld})"
            timeline.start()
            timeline.note(f"data loaded; limit {LIMIT // MiB} MiB, usage {cg.usage() // MiB} MiB")

            # Range reads from 2 client processes outside the cgroup; a lost connection ends a client.
            with ReadLoad(db, ROWS, clients=2, span=500, reconnect=False) as work:
                daemon = DbguardRun(tmp_path, _config(cg, db, tmp_path))

                def diag() -> str:
                    return (f"timeline:\n{timeline.render(audit_records(audit_path))}\n"
                            f"dbguard exit={daemon.returncode} output tail:\n{daemon.output(1500)}")

                try:
                    daemon.wait_protecting(settle=2)
                except DbguardError as e:
                    pytest.fail(f"{e}\n{diag()}")
                timeline.note(f"dbguard running (pid {daemon.pid})")

                # 1. A hog that shrinking alone can make room for.
                a = procs.add(hog.spawn(160 * MiB, 5 * MiB, 0.15, hold=600, preexec_fn=cg.preexec(),
                                        stdout=subprocess.DEVNULL))
                hogs.append(a)
                timeline.watched[a.pid] = f"hog A (pid {a.pid})"
                timeline.note(f"hog A started (pid {a.pid}, 160 MiB at ~33 MiB/s)")
                _wait(lambda: _pool(db) < POOL, 30, "a buffer pool shrink", diag)
                _wait(lambda: rss(a.pid) >= 155 * MiB or a.poll() is not None, 30, "hog A at full size", diag)
                time.sleep(2)

                # 2. A hog too big for shrinking: a kill is needed.
                b = procs.add(hog.spawn(300 * MiB, 5 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                        stdout=subprocess.DEVNULL))
                hogs.append(b)
                timeline.watched[b.pid] = f"hog B (pid {b.pid})"
                timeline.note(f"hog B started (pid {b.pid}, 300 MiB at ~50 MiB/s)")
                _wait(lambda: a.poll() is not None or b.poll() is not None, 30, "a hog kill", diag)

                # 3. The hogs go away; the pool must come back to the DBA's size.
                for p in hogs:
                    if p.poll() is None:
                        timeline.note(f"test ends hog pid {p.pid} itself")
                        p.kill()          # our own child, not a database process
                    p.wait()
                _wait(lambda: _pool(db) == POOL, 120, "the pool back at 256 MiB", diag)
                time.sleep(1)
                load = work.stop()
            mysqld_alive = db.running() and db.pid() == mysqld
            oom_kills = cg.oom_kills()
        finally:
            if daemon is not None:
                with contextlib.suppress(DbguardError):
                    daemon.stop(20)
            procs.close()
            if timeline is not None:
                timeline.done.set()
                timeline.join(10)

    audit = audit_records(audit_path)
    report = timeline.render(audit)
    print("\n" + report)
    (tmp_path / "timeline.txt").write_text(report)

    assert mysqld_alive, f"mariadbd (pid {mysqld}) died\n{report}"
    assert oom_kills == 0, f"the kernel OOM killer struck {oom_kills} time(s)\n{report}"
    assert load.queries_ok > 0 and load.queries_failed == 0 and load.sessions_lost == 0 and load.errors == [], \
        f"workload: {load.queries_ok} queries, {load.queries_failed} failed, errors {load.errors[:3]}\n{report}"
    shrinks, kills = _shrinks(audit), _kills(audit)
    assert shrinks, f"no shrink_cache in the audit log\n{report}"
    assert kills, f"no kill in the audit log\n{report}"
    assert min(float(r["ts"]) for r in shrinks) < min(float(r["ts"]) for r in kills), report
    assert not any(audit_names(r, mysqld) for r in kills), f"a kill names mariadbd\n{report}"
    assert any(audit_names(r, p.pid) for r in kills for p in hogs), f"no kill names a hog\n{report}"
    assert any(r.get("action") == "grow_cache" for r in audit), report
    pools = [p for _, p in timeline.pools]
    assert min(pools) >= FLOOR and pools[-1] == POOL, report
