"""The benchmark scenarios, each run once per call for one contender, as a JSON-able dict.

    moderate-hogs  lab.scenario.run_pg_scenario defaults: PostgreSQL + six 150 MB hogs, 1000 MB
    moderate-hogs-mariadb  the same hogs next to MariaDB (512 MiB buffer pool kept full by
                   range reads) in a 1000 MB cgroup
    fast-hog       the same database and load, one hog allocating as fast as it can
    runaway        a PostgreSQL session whose sort eats memory, 500 MB cgroup, pgbench beside it
    fork-storm     the postmaster (a protected parent) forks thousands of backends

Times are seconds since the load started (hogs, runaway query or storm): negative before.
Every run builds its own cgroup, cluster and data set, so each contender gets the same ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from lab.cgroup import MemoryCgroup
from lab.scenario import (HogSpec, Kmsg, ScenarioEnv, Watcher, _postgres_pids, _stop_procs, cgroup_oom_victims,
                          count_crash_recoveries, crash_excerpt, killed_hogs, parse_pgbench, read_audit,
                          run_pg_scenario, server_log_victims, start_hogs)

from .contenders import Contender, Sampler, guard_cpu_pct, sampled
from .stats import ratio, windowed_tps

MiB = 1024 * 1024
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Params:
    duration: int          # pgbench -T (or the storm's length)
    warmup: float          # load-free seconds at the start: the no-pressure baseline


DEFAULTS = {
    "moderate-hogs": Params(duration=30, warmup=8.0),
    "moderate-hogs-mariadb": Params(duration=30, warmup=8.0),
    "fast-hog": Params(duration=24, warmup=8.0),
    "runaway": Params(duration=40, warmup=6.0),
    "fork-storm": Params(duration=8, warmup=0.0),
}
QUICK = {
    "moderate-hogs": Params(duration=24, warmup=6.0),
    "moderate-hogs-mariadb": Params(duration=24, warmup=6.0),
    "fast-hog": Params(duration=18, warmup=6.0),
    "runaway": Params(duration=34, warmup=5.0),
    "fork-storm": Params(duration=5, warmup=0.0),
}


# --- shared pieces ---------------------------------------------------------------------------

def baseline_window(p: Params) -> tuple[float, float]:
    """The last seconds before the load: pgbench's first seconds (connecting, caches warming)
    run at a fraction of its steady rate and would flatter every ratio."""
    return -min(4.0, p.warmup - 2.0), 0.0


def hog_alloc_rate(total: int = 2048 * MiB) -> float:
    """GiB/s at which the fast hog's allocator (lab.hog.grow, 64 MiB steps, no pause) fills
    memory when no limit is near: what it asks of the cgroup in the fast-hog scenario."""
    code = ("import time, sys; from lab.hog import grow; t = time.perf_counter(); "
            f"c = grow({total}, {64 * MiB}, 0); print(time.perf_counter() - t)")
    with MemoryCgroup(total + 1024 * MiB) as cg:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             preexec_fn=cg.preexec(), cwd=Path(__file__).resolve().parent.parent)
    return (total / 1024**3) / float(out.stdout.strip())


def _audit_summary(audit: list[dict], wall_t0: float) -> list[dict]:
    """The guard's actions (not start/stop/level bookkeeping), time relative to the load start."""
    skip = {"start", "stop", "reload"}
    out = []
    for rec in audit:
        if rec.get("action") in skip:
            continue
        out.append({"t": round(float(rec.get("ts", wall_t0)) - wall_t0, 3), "action": rec.get("action"),
                    "target": rec.get("target"), "path": rec.get("path"), "result": rec.get("result"),
                    "level": rec.get("level")})
    return out


def _samples(sampler: Sampler | None, t0: float) -> list[dict]:
    if sampler is None:
        return []
    return [{"t": round(s["t"] - t0, 3), "usage_mib": round(s["usage"] / MiB, 1), "psi_some": s["psi_some"],
             "psi_full": s["psi_full"], **({"guard_cpu_s": s["guard_cpu_s"]} if "guard_cpu_s" in s else {})}
            for s in sampler.samples]


def _guard_cost(sink: dict, t0: float, window: float) -> dict:
    sampler: Sampler | None = sink.get("sampler")
    if sampler is None or sampler.guard_pid is None:
        return {}
    ready = sink.get("guard_ready", t0)
    rss = [s.get("guard_rss_kib") for s in sampler.samples if s.get("guard_rss_kib")]
    return {"guard_cpu_idle_pct": guard_cpu_pct(sampler.samples, ready, t0),
            "guard_cpu_pressure_pct": guard_cpu_pct(sampler.samples, t0, t0 + window),
            "guard_rss_mib": round(max(rss) / 1024, 1) if rss else None,
            "guard_peak_rss_mib": round(sampler.guard_hwm_kib / 1024, 1) if sampler.guard_hwm_kib else None}


def _kills(guard_actions: list[dict]) -> list[dict]:
    return [a for a in guard_actions if "kill" in str(a["action"]) or a["action"] in
            ("cancel_query", "terminate_session")]


def pressure_record(p: Params, sink: dict, t0: float, wall_minus_mono: float, *,
                    progress: list[tuple[float, float]], audit: list[dict], timeline: list,
                    limit_at: float | None, first_kill: float | None, db_deaths: list[str], **facts) -> dict:
    """The figures every pressure scenario reports, from what it saw: `progress` is the
    workload's (seconds since the load started, transactions/s), `timeline` the Watcher's
    events; `facts` (survival, sessions, victims, ...) go in as they are."""
    window = p.duration - p.warmup
    base = windowed_tps(progress, *baseline_window(p))
    under = windowed_tps(progress, 0.0, window)
    actions = _audit_summary(audit, t0 + wall_minus_mono)
    return {
        **facts,
        "baseline_tps": base,
        "pressure_tps": under,
        "tps_ratio": ratio(under, base),
        "limit_reached_at": limit_at,
        "first_kill_at": first_kill,
        "time_to_first_kill": (first_kill - limit_at) if first_kill is not None and limit_at is not None else None,
        "db_processes_killed": len(db_deaths),
        "db_deaths": db_deaths[:10],
        "guard_kills": len(_kills(actions)),
        "guard_actions": actions[:200],
        "timeline": [[round(e.t, 3), e.what] for e in timeline],
        "tps_progress": [[round(t, 2), tps] for t, tps in progress],
        "samples": _samples(sink.get("sampler"), t0),
        **_guard_cost(sink, t0, window),
    }


# --- scenarios 1 and 2: run_pg_scenario -------------------------------------------------------

def _pg_scenario(name: str, c: Contender, p: Params, log: Log, **kw) -> dict:
    sink: dict = {}
    wall_minus_mono = time.time() - time.monotonic()
    r = run_pg_scenario(sampled(c, sink), duration=p.duration, warmup=p.warmup, log=log, **kw)
    return pressure_record(
        p, sink, r.hogs_started_monotonic or 0.0, wall_minus_mono,
        progress=r.tps_progress, audit=r.audit, timeline=r.timeline, limit_at=r.limit_reached_at,
        first_kill=r.first_kill_at, db_deaths=r.postgres_deaths,
        db_survived=r.database_survived,
        postmaster_restarted=r.postmaster_restarted,
        crash_recoveries=r.crash_recoveries,
        sessions_lost=r.sessions_lost,
        tx_ok=r.transactions_ok,
        tx_failed=r.transactions_failed,
        client_errors=r.pgbench_errors[:5],
        hogs=r.hogs,
        hogs_killed=len(r.hogs_killed),
        kernel_oom_kills=r.oom_kills,
        oom_victims=r.oom_victims[:10],
        server_log=r.server_log_excerpt,
    )


def moderate_hogs(c: Contender, p: Params, log: Log) -> dict:
    return _pg_scenario("moderate-hogs", c, p, log)


def fast_hog(c: Contender, p: Params, log: Log) -> dict:
    # One hog asking for three times the limit in 64 MiB steps without pause (>1 GB/s here).
    return _pg_scenario("fast-hog", c, p, log, hogs=1, hog_size=3000 * MiB, step=64 * MiB,
                        step_interval=0.0, hog_stagger=0.0)


# --- scenario 1b: the same hogs next to MariaDB ----------------------------------------------

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


def moderate_hogs_mariadb(c: Contender, p: Params, log: Log) -> dict:
    """Scenario 1's six hogs next to a MariaDB whose buffer pool range reads keep full."""
    from lab.mariadb import INSTALL_DB, SERVER, MariaDB, ReadLoad, load_table

    if shutil.which(INSTALL_DB) is None or not Path(SERVER).exists():
        raise RuntimeError("MariaDB not installed: apt-get install mariadb-server (make setup does it)")
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
            db = stack.enter_context(MariaDB(settings={"innodb_buffer_pool_size": f"{m.pool // MiB}M"}, cgroup=cg))
            load_table(db, m.rows)
            db.grant_dbguard()
            configured = int(db.value("SELECT @@GLOBAL.innodb_buffer_pool_size"))
            cg.set_limit(m.limit)
            mysqld = db.pid()
            say(f"MariaDB up, {m.rows:,} rows loaded; limit {m.limit // MiB} MiB, usage {cg.usage() // MiB} MiB")
            env = ScenarioEnv(cg, db, workdir, workdir / "audit.jsonl", say)
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
            start_hogs(spec, cg, watcher, workdir, hold=p.duration + m.regrow_wait + 60, procs=hog_procs)
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
            _stop_procs(hog_procs)
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
                p, sink, t0, wall_minus_mono, progress=progress, audit=read_audit(env.audit_path),
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
            _stop_procs(hog_procs)
        kmsg.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _answers(db) -> bool:
    try:
        return db.value("SELECT 1") == 1
    except Exception:
        return False


def _pool_now(pools: PoolWatch) -> int | None:
    return pools.samples[-1][1] if pools.samples else None


def _mariadb_log_excerpt(text: str, limit: int = 12) -> str:
    keys = ("crash recovery", "Starting MariaDB", "ready for connections", "Resiz", "buffer pool",
            "Out of memory", "Shutdown", "signal")
    return "\n".join([ln for ln in text.splitlines() if any(k in ln for k in keys)
                      and "Loading buffer pool" not in ln and "load completed" not in ln][:limit])


# --- scenario 3: a runaway query --------------------------------------------------------------

# As tests/e2e/test_runaway_session.py: ~3.2 kB rows into an in-memory sort, ~30 MB/s.
RUNAWAY_SQL = ("SELECT count(*) FROM (SELECT g, repeat(md5(g::text), 100) AS m "
               "FROM generate_series(1, 1000000) g "
               "WHERE g % 100 <> 0 OR pg_sleep(0.01) IS NOT NULL ORDER BY m) s")


def runaway_outcome(message: str | None) -> str:
    """How the runaway query ended, from the error its client saw."""
    if message is None:
        return "completed"
    m = message.lower()
    if "due to user request" in m:
        return "cancelled (pg_cancel_backend)"
    if "administrator command" in m:
        return "terminated (pg_terminate_backend)"
    if "statement timeout" in m:
        return "statement_timeout"
    if "crash of another server process" in m or "closed the connection unexpectedly" in m \
            or "server conn crashed" in m or "terminated abnormally" in m or "connection" in m:
        return "backend killed (connection lost)"
    return "error: " + message.splitlines()[0][:80]


def runaway(c: Contender, p: Params, log: Log) -> dict:
    import psycopg
    from lab.pgcluster import PgCluster

    limit = 500 * MiB
    sink: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-bench-runaway-{c.name}-"))
    kmsg = Kmsg()
    watcher: Watcher | None = None
    pgbench = None
    try:
        with contextlib.ExitStack() as stack:
            cg = stack.enter_context(MemoryCgroup(4096 * MiB))
            cluster = stack.enter_context(PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg))
            cluster.pgbench_init(10)
            cg.set_limit(limit)
            postmaster = cluster.postmaster_pid()
            env = ScenarioEnv(cg, cluster, workdir, workdir / "audit.jsonl", lambda m: log(f"[{c.name}] {m}"))
            wall_minus_mono = time.time() - time.monotonic()
            stack.enter_context(sampled(c, sink)(env))
            runaway_conn = stack.enter_context(psycopg.connect(cluster.dsn, autocommit=True))
            rpid = runaway_conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            runaway_conn.execute("SET work_mem = '2GB'")
            runaway_conn.execute(f"SET statement_timeout = '{p.duration}s'")   # a bound if nobody acts

            t_bench = time.monotonic()
            pgbench = cluster.pgbench("-S", "-c", "4", "-j", "2", "-T", str(p.duration), "-P", "1",
                                      "--no-vacuum")
            time.sleep(p.warmup)
            t0 = time.monotonic()
            watcher = Watcher(cg, t0, kills_until=t_bench + p.duration)
            watcher.note("pgbench started", at=t_bench)
            for pid, title in _postgres_pids(cg, postmaster).items():
                label = ("postmaster" if pid == postmaster else
                         f"runaway backend (pid {pid})" if pid == rpid else f"postgres pid {pid} ({title})")
                watcher.watch_process(pid, label)
            watcher.start()
            watcher.note("runaway query starts")
            ended: dict = {}

            def run_query() -> None:
                try:
                    runaway_conn.execute(RUNAWAY_SQL)
                    ended["error"] = None
                except psycopg.Error as e:
                    ended["error"] = str(e)
                ended["at"] = time.monotonic()
            th = threading.Thread(target=run_query, daemon=True)
            th.start()
            try:
                out, err = pgbench.communicate(timeout=p.duration + 60)
            except subprocess.TimeoutExpired:
                pgbench.kill()
                out, err = pgbench.communicate()
            th.join(30)
            if "at" in ended:
                watcher.note(f"runaway query ended: {runaway_outcome(ended.get('error'))}", at=ended["at"])
            watcher.note(f"pgbench finished (exit {pgbench.returncode})")
            time.sleep(1.0)
            survived = cluster.is_up()
            watcher.stop()
            server_log = cluster.log()
            try:
                pm_now = cluster.postmaster_pid()
            except OSError:
                pm_now = None
            bench = parse_pgbench(out or "", err or "")
            progress = [(t - (t0 - t_bench), tps) for t, tps in bench.progress]
            victims = cgroup_oom_victims(kmsg.read(), cg.relpath, server_log_victims(server_log))
            end_at = ended["at"] - t0 if "at" in ended else None
            # The first thing that ended the runaway or anything else: a death, or the SQL cancel.
            firsts = [x for x in (watcher.first_kill, end_at if ended.get("error") else None) if x is not None]
            return pressure_record(
                p, sink, t0, wall_minus_mono, progress=progress, audit=read_audit(env.audit_path),
                timeline=watcher.timeline, limit_at=watcher.limit_reached, first_kill=min(firsts) if firsts else None,
                db_deaths=[lbl for lbl in watcher.deaths if not lbl.startswith("runaway")],
                db_survived=survived and pm_now == postmaster,
                postmaster_restarted=pm_now is not None and pm_now != postmaster,
                crash_recoveries=count_crash_recoveries(server_log),
                sessions_lost=bench.sessions_lost,
                tx_ok=bench.transactions_ok,
                tx_failed=bench.transactions_failed,
                client_errors=bench.errors[:5],
                runaway_outcome=runaway_outcome(ended.get("error")) if "at" in ended else "still running",
                runaway_ended_at=end_at,
                runaway_killed_by_signal=any(lbl.startswith("runaway") for lbl in watcher.deaths),
                kernel_oom_kills=cg.oom_kills(),
                oom_victims=victims[:10],
                server_log=crash_excerpt(server_log),
            )
    finally:
        with contextlib.suppress(Exception):
            if watcher is not None and watcher.is_alive():
                watcher.stop()
        with contextlib.suppress(Exception):
            if pgbench is not None and pgbench.poll() is None:
                pgbench.kill()
                pgbench.wait()
        kmsg.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --- scenario 4: fork storm -------------------------------------------------------------------

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
                scores = [_score(x) for x in pids]
                coverage[f"lowered_score_{label}"] = sum(1 for s in scores if s is not None and s < 0)
            pm_score = _score(cluster.postmaster_pid())
            return {
                "connections": churned,
                "connections_per_s": churned / p.duration,
                "connect_errors": errors[:5],
                "coverage": coverage,
                "postmaster_oom_score_adj": pm_score,
                "db_survived": cluster.is_up(),
                "samples": _samples(sampler, t_start),
                **_guard_cost(sink, t_start, elapsed),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _score(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return None


SCENARIOS = {
    "moderate-hogs": moderate_hogs,
    "moderate-hogs-mariadb": moderate_hogs_mariadb,
    "fast-hog": fast_hog,
    "runaway": runaway,
    "fork-storm": fork_storm,
}
# The database each scenario runs (dbguard's kind): a contender runs where its
# Contender.databases holds it (pg-documented only next to PostgreSQL, and so on).
DATABASE = {name: "postgresql" for name in SCENARIOS} | {"moderate-hogs-mariadb": "mysql"}
