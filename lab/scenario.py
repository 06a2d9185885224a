"""The PostgreSQL memory-pressure scenario from the issue, as one reusable runner.

PostgreSQL 15 (shared_buffers=500MB, pgbench scale 30, `pgbench -S -c 8`) and six 150 MB
hogs share one 1000 MB memory cgroup. Without a guard the kernel OOM killer picks a
PostgreSQL process and the server goes through crash recovery; with one it should not.

    result = run_pg_scenario("none")        # the control case
    result = run_pg_scenario("dbguard")     # `dbguard run` watching the scenario cgroup
    result = run_pg_scenario(my_guard)      # any contender: env -> context manager

Used by tests/e2e, `make demo` (lab/demo.py) and the benchmarks; the pieces every memory
scenario shares (the hogs, dbguard's config for PostgreSQL or MariaDB and the guard that runs
it) are here too, so the MariaDB variant (benchmarks/scenario_mariadb.py) uses the same ones; what
happened is watched by lab.watch, pgbench's output parsed by lab.pgoutput.
Needs root and a memory cgroup controller; everything it starts (cluster, cgroup, hogs, guard) is removed in
`finally` blocks, also on Ctrl-C.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from dbguard.errors import DbguardError
from dbguard.sense.procfs import read_proc
from lab import hog, require
from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun, audit_records, base_config
from lab.pgoutput import count_crash_recoveries, crash_excerpt, parse_pgbench, server_log_victims
from lab.procs import alive, stop_all
from lab.watch import Event, Kmsg, Watcher, cgroup_oom_victims

MiB = 1024 * 1024


@dataclass(frozen=True)
class HogSpec:
    """The issue's hogs: `count` processes, each growing to `size` in `step`s every `interval`
    seconds, started `stagger` seconds apart (six of 150 MB in 5 MB steps: ~100 MB/s each)."""

    count: int = 6
    size: int = 150 * MiB
    step: int = 5 * MiB
    interval: float = 0.05
    stagger: float = 0.3


# --- results ---------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    guard: str
    database_survived: bool           # postmaster alive and accepting connections at the end
    postmaster_restarted: bool        # postmaster pid changed (someone restarted it)
    crash_recoveries: int             # "terminated by signal" / "reinitializing" lines in the log
    server_log_excerpt: str
    sessions_lost: int
    transactions_ok: int
    transactions_failed: int
    tps: float                        # whole pgbench run
    tps_under_pressure: float | None  # mean of the -P 1 progress lines after the hogs started
    hogs: int
    hogs_killed: list[int]            # indexes of hogs that ended by SIGKILL
    hog_pids: list[int]
    hog_exit_codes: list[int | None]
    oom_kills: int                    # kernel OOM kills in the cgroup (memory.oom_control / memory.events)
    oom_victims: list[str]            # "pid 123 (postgres)", from /dev/kmsg and the server log
    postgres_pids: list[int]          # PostgreSQL processes in the cgroup when the hogs started
    postgres_deaths: list[str]        # those that died while pgbench ran
    limit_reached_at: float | None    # seconds after hog start the cgroup first hit its limit
    first_kill_at: float | None       # seconds after hog start of the first hog or database death
    time_to_first_kill: float | None  # first kill minus limit reached, seconds
    timeline: list[Event]
    audit: list[dict]                 # the guard's audit records (JSON lines), when it wrote any
    pgbench_errors: list[str]
    # For timelines and throughput ratios (benchmarks/): pgbench -P 1 lines as (seconds since
    # hog start, tps), and time.monotonic() at hog start, to place other samples on that axis.
    tps_progress: list[tuple[float, float]] = field(default_factory=list)
    hogs_started_monotonic: float | None = None

    def summary(self) -> str:
        lines = [f"guard={self.guard}: survived={self.database_survived} crash_recoveries={self.crash_recoveries} "
                 f"sessions_lost={self.sessions_lost} ok={self.transactions_ok} failed={self.transactions_failed} "
                 f"hogs_killed={len(self.hogs_killed)}/{self.hogs} oom_kills={self.oom_kills} "
                 f"victims={self.oom_victims} time_to_first_kill={self.time_to_first_kill}"]
        lines += [f"  {e}" for e in self.timeline]
        if self.pgbench_errors:
            lines.append("  pgbench: " + " | ".join(self.pgbench_errors[:3]))
        if self.server_log_excerpt:
            lines.append("  server log:\n    " + self.server_log_excerpt.replace("\n", "\n    "))
        return "\n".join(lines)


# --- guards ----------------------------------------------------------------------------------

@dataclass
class ScenarioEnv:
    """What a guard gets to protect the scenario: the cgroup, the cluster, a scratch dir."""

    cgroup: MemoryCgroup
    cluster: object            # lab.pgcluster.PgCluster, or lab.mariadb.MariaDB
    workdir: Path
    audit_path: Path
    log: Callable[[str], None]
    # "flat": database and hogs in `cgroup`, which dbguard is told to watch ([pressure] cgroup).
    # "parent": the limit on `cgroup`, the database and the hogs in unlimited sibling sub-groups
    # (db/, hogs/), and no [pressure] cgroup: dbguard must find the limit that applies itself.
    layout: str = "flat"
    discover_scope: bool = False    # no [pressure] cgroup: dbguard finds the scope itself

    @property
    def kind(self) -> str:
        """dbguard's database kind: "postgresql", or "mysql" for a MariaDB."""
        from lab.mariadb import MariaDB
        return "mysql" if isinstance(self.cluster, MariaDB) else "postgresql"


Guard = Callable[[ScenarioEnv], ContextManager[None]]


@dataclass
class Placement:
    """Where a scenario's pieces live: the database's cgroup, the hogs', and the watched one
    (where the limit is: its counters are the scenario's). By default one MemoryCgroup is all
    three; lab.systemd makes units of them (the limit on the database's unit, on a parent
    slice, or nowhere but the host's RAM)."""

    database: MemoryCgroup
    hogs: MemoryCgroup
    watched: MemoryCgroup
    discover_scope: bool = False    # dbguard is given no [pressure] cgroup and finds it itself


def _database(env: ScenarioEnv) -> dict:
    """The [[databases]] entry: the cluster's DSN, or for a MariaDB its socket and the dbguard
    user (MariaDB.grant_dbguard) with a password file written next to the config."""
    if env.kind == "postgresql":
        return {"name": "scenario", "kind": "postgresql", "dsn": env.cluster.dsn}
    db = env.cluster
    if db.dbguard_password is None:
        raise DbguardError("MariaDB: no dbguard user yet (call MariaDB.grant_dbguard() first)")
    pw = env.workdir / "mysql.password"
    pw.write_text(db.dbguard_password + "\n")
    pw.chmod(0o600)
    return {"name": "scenario", "kind": "mysql", "socket": db.socket, "user": db.DBGUARD_USER,
            "password_file": str(pw)}


def dbguard_config(env: ScenarioEnv, extra: dict | None = None) -> dict:
    """The scenario's config (lab.launcher's dict form); `extra` adds tables or keys
    ({"bpf": {"enabled": False}})."""
    cfg = base_config(env.workdir, env.cgroup.path if env.layout == "flat" and not env.discover_scope else None)
    cfg["audit"]["path"] = str(env.audit_path)
    cfg["databases"] = [_database(env)]
    for table, keys in (extra or {}).items():
        cfg.setdefault(table, {}).update(keys)
    return cfg


@contextlib.contextmanager
def dbguard_guard(env: ScenarioEnv, *, settle: float = 1.0, extra_args: tuple[str, ...] = (),
                  extra_config: dict | None = None, database: dict | None = None) -> Iterator[DbguardRun]:
    """`dbguard run` outside the cgroup, protecting from before the block until its end;
    `settle` s after its "start" record let it finish its first cycle (scores raised, BPF
    maps filled). `database`: keys that replace those of the [[databases]] entry (a DSN whose
    login is refused, {"dsn": ...})."""
    cfg = dbguard_config(env, extra_config)
    cfg["databases"][0].update(database or {})
    run = DbguardRun(env.workdir, cfg, *extra_args)
    try:
        try:
            run.wait_protecting(settle=settle)
        except DbguardError as e:
            raise DbguardError(f"{e} (before the test load)") from None
        env.log(f"dbguard active (pid {run.pid}, {len(run.audit())} audit records so far)")
        yield run
        if not run.running():
            env.log(f"dbguard exited early with code {run.returncode}: {run.tail()}")
    finally:
        try:
            run.stop(15)
        except DbguardError as e:
            env.log(str(e))
        env.log(f"dbguard stopped (exit {run.returncode}); last output: {run.tail(3) or 'none'}")


@contextlib.contextmanager
def _no_guard(env: ScenarioEnv) -> Iterator[None]:
    yield


def _resolve_guard(guard: str | Guard) -> tuple[str, Guard]:
    if guard == "none":
        return "none", _no_guard
    if guard == "dbguard":
        return "dbguard", dbguard_guard
    if callable(guard):
        return getattr(guard, "__name__", "custom"), guard
    raise ValueError(f"guard must be 'none', 'dbguard' or a callable, got {guard!r}")


# --- the runner ------------------------------------------------------------------------------

def require_lab() -> None:
    """One-line DbguardError when this host cannot run the scenario."""
    require.root("the memory-pressure scenario (memory cgroups, oom counters)")
    require.memory_cgroups()
    require.postgresql()
    require.pgbench()


def postgres_pids(cg: MemoryCgroup, postmaster: int) -> dict[int, str]:
    """The postmaster and its children in the cgroup (by parentage, not by name), with titles."""
    out = {}
    for pid in cg.pids():
        proc = read_proc(pid)
        if proc is not None and postmaster in (proc.pid, proc.ppid):
            out[pid] = proc.cmdline
    return out


def start_hogs(spec: HogSpec, cg: MemoryCgroup, watcher: Watcher, workdir: Path, hold: float,
               procs: list[subprocess.Popen], rel: str | None = None) -> list[subprocess.Popen]:
    """The hogs in the cgroup, `spec.stagger` s apart, each watched by pidfd ("hog i (pid N)")
    and appended to `procs` as it starts (the caller's cleanup sees every one); their output
    goes to workdir/hogI.out. They hold their memory for `hold` s."""
    for i in range(spec.count):
        with open(workdir / f"hog{i}.out", "wb") as out:      # the child keeps its own copy
            p = hog.spawn(spec.size, spec.step, spec.interval, hold=hold, preexec_fn=cg.preexec(rel), stdout=out)
        procs.append(p)
        watcher.watch_process(p.pid, f"hog {i} (pid {p.pid})")
        time.sleep(spec.stagger)
    return procs


def hogs_settled(procs: list[subprocess.Popen], workdir: Path) -> bool:
    """Every hog of start_hogs either holds its full size (its "holding" line) or has ended."""
    return all(p.poll() is not None or "holding" in (workdir / f"hog{i}.out").read_text(errors="replace")
               for i, p in enumerate(procs))


def killed_hogs(exit_codes: list[int | None]) -> list[int]:
    """Indexes of the hogs that ended by SIGKILL (read before the cleanup kills the rest)."""
    return [i for i, rc in enumerate(exit_codes) if rc == -signal.SIGKILL]


def run_pg_scenario(guard: str | Guard = "none", *,
                    limit: int = 1000 * MiB,
                    load_limit: int = 4096 * MiB,
                    shared_buffers: str = "500MB",
                    scale: int = 30,
                    clients: int = 8,
                    hogs: int = HogSpec.count,
                    hog_size: int = HogSpec.size,
                    step: int = HogSpec.step,
                    step_interval: float = HogSpec.interval,
                    hog_stagger: float = HogSpec.stagger,
                    duration: int = 45,
                    warmup: float = 8.0,
                    settle: float | None = None,
                    audit_dir: str | os.PathLike | None = None,
                    port: int | None = None,
                    layout: str = "flat",
                    placement: Callable[[], ContextManager[Placement]] | None = None,
                    log: Callable[[str], None] | None = None) -> ScenarioResult:
    """Run the scenario once and report what happened. See the module docstring.

    pgbench runs `-S -c clients -T duration`; the hogs start `warmup` seconds in, so the
    backends have touched shared buffers, as on a server that has been up for a while.
    `layout`: "flat" (one cgroup) or "parent" (the limit on a parent, PostgreSQL and the hogs in
    unlimited sibling sub-groups; see ScenarioEnv.layout).
    `placement` makes the cgroups instead (then `limit` and `load_limit` are its business).
    `settle`: end the load `settle` seconds after every hog holds its memory or has ended
    (`duration` is then only the bound), for a machine whose speed is unknown (the TCG test VM):
    there a fixed run may end before the hogs have grown, and the scenario has shown nothing.
    """
    if layout not in ("flat", "parent"):
        raise ValueError(f"layout must be 'flat' or 'parent', got {layout!r}")
    from lab.pgcluster import PgCluster      # written in parallel; imported late on purpose

    require_lab()
    guard_name, guard_cm = _resolve_guard(guard)
    say = log or (lambda msg: None)
    workdir = Path(tempfile.mkdtemp(prefix=f"dbguard-scenario-{guard_name}-"))
    audit_path = Path(audit_dir or workdir) / "audit.jsonl"
    hog_procs: list[subprocess.Popen] = []
    pgbench: subprocess.Popen | None = None
    kmsg = Kmsg()
    watcher: Watcher | None = None
    try:
        with contextlib.ExitStack() as stack:
            if placement is None:
                cg = stack.enter_context(MemoryCgroup(load_limit))
                say(f"[{guard_name}] cgroup {cg.path} (limit {load_limit // MiB} MiB while loading)")
                place = Placement(cg if layout == "flat" else cg.child("db"), cg, cg)
            else:
                place = stack.enter_context(placement())
                cg = place.watched
                say(f"[{guard_name}] database in {place.database.path}, hogs in {place.hogs.path}, "
                    f"watching {cg.path}")
            db_cg = place.database
            cluster = stack.enter_context(PgCluster(port=port, settings={"shared_buffers": shared_buffers},
                                                    cgroup=db_cg))
            say(f"[{guard_name}] PostgreSQL up on port {cluster.port if hasattr(cluster, 'port') else '?'}; "
                f"pgbench -i -s {scale} ...")
            cluster.pgbench_init(scale)
            if placement is None:
                cg.set_limit(limit)
            shown = f"{cg.limit_bytes // MiB} MiB" if cg.limit_bytes else "none (the host's RAM)"
            say(f"[{guard_name}] dataset loaded; limit now {shown}, usage {cg.usage() // MiB} MiB")
            postmaster = cluster.postmaster_pid()

            env = ScenarioEnv(cg, cluster, workdir, audit_path, lambda m: say(f"[{guard_name}] {m}"), layout=layout,
                              discover_scope=place.discover_scope)
            stack.enter_context(guard_cm(env))

            t_bench = time.monotonic()
            pgbench = cluster.pgbench("-S", "-c", str(clients), "-j", str(min(clients, 2)),
                                      "-T", str(duration), "-P", "1", "--no-vacuum")
            say(f"[{guard_name}] pgbench -S -c {clients} -T {duration} running; hogs in {warmup:g} s")
            time.sleep(warmup)

            t0 = time.monotonic()
            watcher = Watcher(cg, t0, kills_until=t_bench + duration)
            watcher.note("pgbench started", at=t_bench)
            pg_pids = postgres_pids(db_cg, postmaster)
            for pid, title in pg_pids.items():
                watcher.watch_process(pid, "postmaster" if pid == postmaster else f"postgres pid {pid} ({title})")
            watcher.start()
            watcher.note(f"starting {hogs} hogs of {hog_size // MiB} MiB (usage {cg.usage() // MiB} MiB)")
            start_hogs(HogSpec(hogs, hog_size, step, step_interval, hog_stagger), place.hogs, watcher, workdir,
                       hold=duration + 60, procs=hog_procs,
                       rel=None if layout == "flat" or placement is not None else "hogs")
            say(f"[{guard_name}] {hogs} hogs started")

            if settle is not None:
                _end_load_when_settled(pgbench, hog_procs, workdir, settle, watcher)
            try:
                stdout, stderr = pgbench.communicate(timeout=duration + 60)
            except subprocess.TimeoutExpired:
                pgbench.kill()
                stdout, stderr = pgbench.communicate()
            watcher.note(f"pgbench finished (exit {pgbench.returncode})")
            time.sleep(1.0)      # a postmaster mid-recovery needs a moment to answer or to give up
            survived = alive(postmaster) and cluster.is_up()
            watcher.stop()
            # exit codes before our own cleanup SIGKILLs the survivors
            hog_exits = [p.poll() for p in hog_procs]
            stop_all(hog_procs)

            bench = parse_pgbench(_text(stdout), _text(stderr))
            bench.exit_code = pgbench.returncode
            server_log = cluster.log()
            hog_start_in_bench = t0 - t_bench
            under = [tps for t, tps in bench.progress if t > hog_start_in_bench]
            limit_at, first_kill = watcher.limit_reached, watcher.first_kill
            victims = cgroup_oom_victims(kmsg.read(), cg.relpath, server_log_victims(server_log))
            current = _safe(cluster.postmaster_pid)
            result = ScenarioResult(
                guard=guard_name,
                database_survived=survived,
                postmaster_restarted=bool(current) and current != postmaster,
                crash_recoveries=count_crash_recoveries(server_log),
                server_log_excerpt=crash_excerpt(server_log),
                sessions_lost=bench.sessions_lost,
                transactions_ok=bench.transactions_ok,
                transactions_failed=bench.transactions_failed,
                tps=bench.tps,
                tps_under_pressure=sum(under) / len(under) if under else None,
                hogs=hogs,
                hogs_killed=killed_hogs(hog_exits),
                hog_exit_codes=hog_exits,
                hog_pids=[p.pid for p in hog_procs],
                oom_kills=cg.oom_kills(),
                oom_victims=victims,
                postgres_pids=sorted(pg_pids),
                postgres_deaths=[lbl for lbl in watcher.deaths if not lbl.startswith("hog ")],
                limit_reached_at=limit_at,
                first_kill_at=first_kill,
                time_to_first_kill=(first_kill - limit_at) if first_kill is not None and limit_at is not None
                else None,
                timeline=watcher.timeline,
                audit=audit_records(audit_path),
                pgbench_errors=bench.errors[:10],
                tps_progress=[(t - hog_start_in_bench, tps) for t, tps in bench.progress],
                hogs_started_monotonic=t0,
            )
        say(f"[{guard_name}] done: survived={result.database_survived}, crash recoveries "
            f"{result.crash_recoveries}, hogs killed {len(result.hogs_killed)}")
        return result
    finally:
        # Each step on its own: one failing must not leave the others' leftovers behind.
        # (The cluster and the cgroup are closed by the ExitStack above, guard first.)
        with contextlib.suppress(Exception):
            if watcher is not None and watcher.is_alive():
                watcher.stop()
        with contextlib.suppress(Exception):
            if pgbench is not None and pgbench.poll() is None:
                pgbench.kill()
                pgbench.wait()
        with contextlib.suppress(Exception):
            stop_all(hog_procs)
        kmsg.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _end_load_when_settled(pgbench: subprocess.Popen, hog_procs: list[subprocess.Popen], workdir: Path,
                           settle: float, watcher: Watcher) -> None:
    while pgbench.poll() is None and not hogs_settled(hog_procs, workdir):
        time.sleep(0.5)
    if pgbench.poll() is not None:
        return
    watcher.note(f"every hog holds its memory or has ended; pgbench ends in {settle:g} s")
    time.sleep(settle)
    watcher.kills_until = time.monotonic()      # backends exiting from here on are pgbench's end
    # SIGALRM is how pgbench ends its own -T run: it stops, reports and exits as at the end of -T.
    pgbench.send_signal(signal.SIGALRM)


def _safe(fn: Callable[[], int | None]) -> int | None:
    try:
        return fn()
    except Exception:
        return None


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")
