"""Scenario 1b, moderate-hogs-mariadb: scenario 1's six hogs next to a MariaDB whose buffer
pool range reads keep full, in a 1000 MB cgroup (benchmarks.scenarios lists every scenario)."""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from lab import require
from lab.cgroup import MemoryCgroup
from lab.launcher import audit_records
from lab.procs import stop_all
from lab.scenario import HogSpec, ScenarioEnv, killed_hogs, start_hogs
from lab.watch import Kmsg, Watcher, cgroup_oom_victims

from .contenders import Contender, sampled
from .record import Log, Params, pressure_record

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class MariaDBSetup:
    pool: int = 512 * MiB        # innodb_buffer_pool_size: as shared_buffers=500MB in scenario 1
    rows: int = 2_000_000        # ~610 MiB of InnoDB pages: more than the pool holds, so it is full
    clients: int = 4             # range-read client processes (lab.mariadb.ReadLoad)
    # mariadbd holds ~610 MiB here at baseline (RSS, measured: pool full, 4 clients reading), so
    # 1000 MB leaves it ~390 MB of headroom without pressure (below dbguard's 80 % warn mark) and
    # six 150 MB hogs overrun it by ~500 MB: without a guard the kernel must kill. The same limit
    # as scenario 1, so the two databases face the same box.
    limit: int = 1000 * MiB
    regrow_wait: float = 60.0    # after the load: seconds to wait for a shrunk pool to be grown back


MARIADB = MariaDBSetup()
_INNODB_RECOVERY = "Starting crash recovery"


class PoolWatch(threading.Thread):
    """@@innodb_buffer_pool_size every `period` s over its own connection: (monotonic, bytes),
    None while the server does not answer."""

    def __init__(self, db, period: float = 0.5):
        super().__init__(name="bench-pool-watch", daemon=True)
        self.db, self.period = db, period
        self.samples: list[tuple[float, int | None]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import pymysql
        conn = None
        while not self._halt.is_set():
            size = None
            try:
                if conn is None:
                    conn = self.db.connect(read_timeout=5, connect_timeout=2)
                with conn.cursor() as cur:
                    cur.execute("SELECT @@GLOBAL.innodb_buffer_pool_size")
                    size = int(cur.fetchone()[0])
            except (pymysql.err.MySQLError, OSError):
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            self.samples.append((time.monotonic(), size))
            self._halt.wait(self.period)
        with contextlib.suppress(Exception):
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def moderate_hogs_mariadb(c: Contender, p: Params, log: Log, layout: str = "flat") -> dict:
    """Scenario 1's six hogs next to a MariaDB whose buffer pool range reads keep full.
    `layout` "parent": the limit on the parent, MariaDB and the hogs in unlimited sibling
    sub-groups, no [pressure] cgroup for dbguard (lab.scenario.ScenarioEnv.layout)."""
    from lab.mariadb import MariaDB, ReadLoad, load_table

    require.mariadb()
    m, spec = MARIADB, HogSpec()
    sink: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-bench-mariadb-{c.name}-"))
    kmsg = Kmsg()
    watcher: Watcher | None = None
    load: ReadLoad | None = None
    pools: PoolWatch | None = None
    hog_procs: list[subprocess.Popen] = []
    say = lambda msg: log(f"[{c.name}] {msg}")      # noqa: E731
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(4096 * MiB))
            db_cg = cg if layout == "flat" else cg.child("db")
            db = stack.enter_context(MariaDB(settings={"innodb_buffer_pool_size": f"{m.pool // MiB}M"}, cgroup=db_cg))
            load_table(db, m.rows)
            db.grant_dbguard()
            configured = int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size"))
            cg.set_limit(m.limit)
            mysqld = db.pid()
            say(f"MariaDB up, {m.rows:,} rows loaded; limit {m.limit // MiB} MiB, usage {cg.usage() // MiB} MiB")
            env = ScenarioEnv(cg, db, workdir, workdir / "audit.jsonl", say, layout=layout)
            wall_minus_mono = time.time() - time.monotonic()
            stack.enter_context(sampled(c, sink)(env))
            pools = PoolWatch(db)
            pools.start()

            load = ReadLoad(db, m.rows, clients=m.clients).start()
            t_load = load.t_start
            time.sleep(p.warmup)
            t0 = time.monotonic()
            usage_at_load = cg.usage()
            watcher = Watcher(cg, t0, kills_until=t_load + p.duration, load="the read load")
            watcher.note(f"range reads started ({m.clients} clients)", at=t_load)
            watcher.watch_process(mysqld, f"mariadbd (pid {mysqld})")
            watcher.start()
            watcher.note(f"starting {spec.count} hogs of {spec.size // MiB} MiB (usage {usage_at_load // MiB} MiB)")
            start_hogs(spec, cg, watcher, workdir, hold=p.duration + m.regrow_wait + 60, procs=hog_procs,
                       rel=None if layout == "flat" else "hogs")
            seen = len(db.starts)

            def note_restarts() -> None:       # a supervisor (mariadb-documented) started it again
                nonlocal seen
                for at, pid in db.starts[seen:]:
                    watcher.note(f"mariadbd restarted (pid {pid})", at=at)
                    watcher.watch_process(pid, f"mariadbd restart {seen} (pid {pid})")
                    seen += 1
            while time.monotonic() < t_load + p.duration:
                note_restarts()
                time.sleep(0.1)
            summary = load.stop()
            load = None
            watcher.note("range reads stopped")
            time.sleep(1.0)
            survived = db.running() and db.pid() == mysqld and _answers(db)
            hog_exits = [h.poll() for h in hog_procs]
            stop_all(hog_procs)
            t_hogs_gone = time.monotonic()
            watcher.note("hogs left ended by the benchmark", at=t_hogs_gone)

            # With the hogs gone: a shrunk pool should be grown back, a supervised server be up
            # again. Wait for both (up to regrow_wait), or until the server has been down 10 s
            # (twice systemd's RestartSec: nobody is going to start it).
            deadline, down_since, back = t_hogs_gone + m.regrow_wait, None, None
            while time.monotonic() < deadline:
                note_restarts()
                up = db.running() and _answers(db)
                if up and int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size")) == configured:
                    back = time.monotonic()
                    break
                down_since = None if up else (down_since or time.monotonic())
                if down_since and time.monotonic() - down_since > 10.0:
                    break
                time.sleep(0.25)
            note_restarts()
            watcher.stop()
            pools.stop()
            up_at_end = db.running() and _answers(db)
            final = int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size")) if up_at_end else None
            sizes = [(t, b) for t, b in pools.samples if b is not None] + ([(back, configured)] if back else [])
            server_log = db.error_log.read_text(errors="replace") if db.error_log.exists() else ""
            restarts = [(round(at - t0, 3), pid) for at, pid in db.starts[1:]]
            progress = [(t - (t0 - t_load), q) for t, q in summary.progress]
            return pressure_record(
                p, sink, t0, wall_minus_mono, progress=progress, audit=audit_records(env.audit_path),
                timeline=watcher.timeline, limit_at=watcher.limit_reached, first_kill=watcher.first_kill,
                db_deaths=[lbl for lbl in watcher.deaths if lbl.startswith("mariadbd")],
                db_survived=survived,
                db_restarts=len(restarts),
                db_restarted_at=restarts[:10],
                db_up_at_end=up_at_end,
                crash_recoveries=sum(1 for ln in server_log.splitlines() if _INNODB_RECOVERY in ln),
                sessions_lost=summary.sessions_lost,
                tx_ok=summary.queries_ok,
                tx_failed=summary.queries_failed,
                client_errors=summary.errors[:5],
                reconnects=summary.reconnects,
                hogs=spec.count,
                hogs_killed=len(killed_hogs(hog_exits)),
                kernel_oom_kills=cg.oom_kills(),
                oom_victims=cgroup_oom_victims(kmsg.read(), cg.relpath)[:10],
                usage_at_load_mib=round(usage_at_load / MiB),
                pool_configured_mib=configured // MiB,
                pool_min_mib=min(b for _, b in sizes) // MiB if sizes else None,
                pool_final_mib=final // MiB if final else None,
                # pool at its configured size again, seconds after the hogs were gone (0: it was)
                pool_back_after_s=round(max(0.0, back - t_hogs_gone), 1) if back is not None else None,
                pool_samples=[[round(t - t0, 2), round(b / MiB)] for t, b in sizes],
                server_log=_mariadb_log_excerpt(server_log),
            )
    finally:
        with contextlib.suppress(Exception):
            if watcher is not None and watcher.is_alive():
                watcher.stop()
        with contextlib.suppress(Exception):
            if load is not None:
                load.stop()
        with contextlib.suppress(Exception):
            if pools is not None and pools.is_alive():
                pools.stop()
        with contextlib.suppress(Exception):
            stop_all(hog_procs)
        kmsg.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _answers(db) -> bool:
    try:
        return db.value("SELECT 1") == 1
    except Exception:
        return False


def _mariadb_log_excerpt(text: str, limit: int = 12) -> str:
    keys = ("crash recovery", "Starting MariaDB", "ready for connections", "Resiz", "buffer pool",
            "Out of memory", "Shutdown", "signal")
    return "\n".join([ln for ln in text.splitlines() if any(k in ln for k in keys)
                      and "Loading buffer pool" not in ln and "load completed" not in ln][:limit])
