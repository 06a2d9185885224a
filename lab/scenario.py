"""The PostgreSQL memory-pressure scenario from the issue, as one reusable runner.

PostgreSQL 15 (shared_buffers=500MB, pgbench scale 30, `pgbench -S -c 8`) and six 150 MB
hogs share one 1000 MB memory cgroup. Without a guard the kernel OOM killer picks a
PostgreSQL process and the server goes through crash recovery; with one it should not.

    result = run_pg_scenario("none")        # the control case
    result = run_pg_scenario("dbguard")     # `dbguard run` watching the scenario cgroup
    result = run_pg_scenario(my_guard)      # any contender: env -> context manager

Used by tests/e2e, `make demo` (lab/demo.py) and the benchmarks; the pieces every memory
scenario shares (the hogs, the Watcher, OOM victims, dbguard's config for PostgreSQL or
MariaDB) are here too, so the MariaDB variant (benchmarks/scenarios.py) uses the same ones.
Needs root and a memory cgroup controller; everything it starts (cluster, cgroup, hogs, guard) is removed in
`finally` blocks, also on Ctrl-C.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from dbguard.errors import DbguardError
from dbguard.sense.procfs import read_proc
from lab import hog
from lab.cgroup import MemoryCgroup, own_memory_cgroup

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


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
class Event:
    t: float                   # seconds since the hogs started (negative: before)
    what: str

    def __str__(self) -> str:
        return f"{self.t:+9.3f}s  {self.what}"


@dataclass
class PgbenchSummary:
    transactions_ok: int = 0
    transactions_failed: int = 0      # reported failed + one in-flight transaction per aborted client
    sessions_lost: int = 0            # clients that aborted (connection dropped, FATAL, ...)
    tps: float = 0.0                  # whole run, as pgbench reports it
    progress: list[tuple[float, float]] = field(default_factory=list)   # (seconds since start, tps)
    errors: list[str] = field(default_factory=list)                     # first few error lines
    exit_code: int | None = None


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


# --- pure parsing ----------------------------------------------------------------------------

_CRASH_RE = re.compile(r"terminated by signal|all server processes terminated; reinitializing")
_LOG_VICTIM_RE = re.compile(r"\(PID (\d+)\) was terminated by signal 9")
_PROGRESS_RE = re.compile(r"^progress: ([\d.]+) s, ([\d.]+) tps")
_ABORT_RE = re.compile(r"client \d+ .*aborted|client \d+ aborted")


def count_crash_recoveries(server_log: str) -> int:
    return sum(1 for line in server_log.splitlines() if _CRASH_RE.search(line))


def crash_excerpt(server_log: str, limit: int = 12) -> str:
    """The log lines that tell the story of a crash (or of a clean run: nothing)."""
    keys = ("terminated by signal", "reinitializing", "crash", "shutting down", "shut down",
            "database system is", "out of memory", "terminating connection", "startup process")
    return "\n".join([ln for ln in server_log.splitlines() if any(k in ln for k in keys)][:limit])


def server_log_victims(server_log: str) -> list[int]:
    return [int(m.group(1)) for m in _LOG_VICTIM_RE.finditer(server_log)]


def parse_pgbench(stdout: str, stderr: str) -> PgbenchSummary:
    s = PgbenchSummary()
    for line in stdout.splitlines():
        if m := re.match(r"number of transactions actually processed: (\d+)", line):
            s.transactions_ok = int(m.group(1))
        elif m := re.match(r"number of failed transactions: (\d+)", line):
            s.transactions_failed += int(m.group(1))
        elif m := re.match(r"tps = ([\d.]+)", line):
            s.tps = float(m.group(1))
    for line in stderr.splitlines():
        if m := _PROGRESS_RE.match(line):
            s.progress.append((float(m.group(1)), float(m.group(2))))
        elif _ABORT_RE.search(line):
            s.sessions_lost += 1
            s.errors.append(line.strip())
        elif "error" in line.lower() or "fatal" in line.lower():
            s.errors.append(line.strip())
    s.transactions_failed += s.sessions_lost
    return s


_KMSG_OOM_RE = re.compile(r"oom-kill:.*oom_memcg=([^,]+),.*task=([^,]+),pid=(\d+)")


def kmsg_oom_victims(lines: list[str], memcg: str) -> list[tuple[int, str]]:
    """(pid, comm) of kernel OOM kills in `memcg` (as /proc/PID/cgroup shows it) or below."""
    out = []
    for line in lines:
        m = _KMSG_OOM_RE.search(line)
        if m and (m.group(1) == memcg or m.group(1).startswith(memcg + "/")):
            out.append((int(m.group(3)), m.group(2)))
    return out


def cgroup_oom_victims(kmsg_lines: list[str], memcg: str, log_pids: list[int] = (),
                       log_label: str = "postgres, from the server log") -> list[str]:
    """"pid 123 (comm)" for each kernel OOM kill in the cgroup, plus processes that only the
    database's own log names as killed (`log_pids`)."""
    victims = [f"pid {pid} ({comm})" for pid, comm in kmsg_oom_victims(kmsg_lines, memcg)]
    for pid in log_pids:
        if not any(v.startswith(f"pid {pid} ") for v in victims):
            victims.append(f"pid {pid} ({log_label})")
    return victims


# --- kernel readers --------------------------------------------------------------------------

class Kmsg:
    """Kernel log records written after construction (empty when /dev/kmsg is unreadable)."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None

    def read(self) -> list[str]:
        lines: list[str] = []
        while self.fd is not None:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:      # records overwritten before we read them: skip ahead
                continue
            if not rec:
                break
            lines.append(rec.decode(errors="replace").split(";", 1)[-1].rstrip("\n"))
        return lines

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _limit_counters(cg: MemoryCgroup) -> tuple[int, int]:
    """(times the cgroup hit its limit, kernel OOM kills) from the cgroup's own counters."""
    if cg.version == 1:
        return int((cg.path / "memory.failcnt").read_text()), cg.oom_kills()
    events = dict(line.split() for line in (cg.path / "memory.events").read_text().splitlines())
    return int(events.get("max", 0)), int(events.get("oom_kill", 0))


class Watcher(threading.Thread):
    """Timestamps the scenario's events as they happen, into `timeline`.

    Process deaths come from pidfds (exact); on cgroup v1 the limit and the OOM killer also
    notify through eventfds registered in cgroup.event_control (sub-millisecond). The
    failcnt / memory.events counters are polled every 2 ms as well, which covers cgroup v2.
    """

    POLL = 0.002

    def __init__(self, cg: MemoryCgroup, t0: float, kills_until: float, load: str = "pgbench"):
        super().__init__(name="scenario-watcher", daemon=True)
        # After `kills_until` (the end of the load, e.g. pgbench's -T) backends exit because their
        # client is done: deaths are still noted, but no longer count as kills.
        self.cg, self.t0, self.kills_until, self.load = cg, t0, kills_until, load
        self.timeline: list[Event] = []
        self.limit_reached: float | None = None
        self.first_kill: float | None = None
        self.deaths: dict[str, float] = {}     # label -> time
        self._lock = threading.Lock()
        self._stopfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._stopfd, select.EPOLLIN)
        self._fds: dict[int, tuple[str, str]] = {}   # fd -> (kind, label)
        self._files: list[int] = []
        self._base = _limit_counters(cg)
        self._oom_noted = False
        if cg.version == 1:
            self._v1_event("memory.usage_in_bytes", f" {cg.limit_bytes - 2 * MiB}", "limit")
            self._v1_event("memory.oom_control", "", "oom")

    def _v1_event(self, filename: str, arg: str, kind: str) -> None:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ffd = os.open(self.cg.path / filename, os.O_RDONLY | os.O_CLOEXEC)
        (self.cg.path / "cgroup.event_control").write_text(f"{efd} {ffd}{arg}")
        self._files += [efd, ffd]
        self._fds[efd] = (kind, filename)
        self._ep.register(efd, select.EPOLLIN)

    def watch_process(self, pid: int, label: str) -> None:
        try:
            pfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.note(f"{label} already gone")
            return
        with self._lock:
            self._fds[pfd] = ("death", label)
            self._files.append(pfd)
        self._ep.register(pfd, select.EPOLLIN)

    def note(self, what: str, at: float | None = None) -> float:
        t = (at if at is not None else time.monotonic()) - self.t0
        with self._lock:
            self.timeline.append(Event(t, what))
        return t

    def _limit(self, how: str) -> None:
        if self.limit_reached is None:
            self.limit_reached = self.note(f"cgroup reached its limit ({how})")

    def _kill(self, what: str) -> None:
        t = self.note(what)
        if self.first_kill is None:
            self.first_kill = t

    def run(self) -> None:
        oom_seen = self._base[1]
        while True:
            for fd, _ in self._ep.poll(self.POLL):
                if fd == self._stopfd:
                    return
                kind, label = self._fds[fd]
                if kind == "death":
                    self._ep.unregister(fd)
                    now = time.monotonic()
                    if now >= self.kills_until:
                        self.note(f"{label} exited after {self.load}'s run")
                        continue
                    with self._lock:
                        self.deaths[label] = now - self.t0
                    self._kill(f"{label} died")
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    if kind == "limit":
                        self._limit("usage threshold event")
                    elif not self._oom_noted:     # it fires on every OOM attempt: note the first
                        self._oom_noted = True
                        self.note("cgroup out of memory (memory.oom_control event)")
            try:
                hits, ooms = _limit_counters(self.cg)
            except OSError:
                continue
            if hits > self._base[0]:
                self._limit("failcnt" if self.cg.version == 1 else "memory.events max")
            if ooms > oom_seen:
                self._kill(f"kernel OOM kill #{ooms - self._base[1]} (counter)")
                oom_seen = ooms

    def stop(self) -> None:
        os.eventfd_write(self._stopfd, 1)
        if self.is_alive():
            self.join(5)
        for fd in self._files + [self._stopfd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ep.close()
        self.timeline.sort(key=lambda e: e.t)


# --- guards ----------------------------------------------------------------------------------

@dataclass
class ScenarioEnv:
    """What a guard gets to protect the scenario: the cgroup, the cluster, a scratch dir."""

    cgroup: MemoryCgroup
    cluster: object            # lab.pgcluster.PgCluster, or lab.mariadb.MariaDB
    workdir: Path
    audit_path: Path
    log: Callable[[str], None]

    @property
    def kind(self) -> str:
        """dbguard's database kind: "postgresql", or "mysql" for a MariaDB."""
        from lab.mariadb import MariaDB
        return "mysql" if isinstance(self.cluster, MariaDB) else "postgresql"


Guard = Callable[[ScenarioEnv], ContextManager[None]]


def _toml_str(s: str) -> str:
    return json.dumps(s)       # a JSON string is a valid TOML basic string


def _database_keys(env: ScenarioEnv) -> list[str]:
    """The [[databases]] entry's kind and access: the cluster's DSN, or for a MariaDB its socket
    and the dbguard user (MariaDB.grant_dbguard) with a password file written next to the config."""
    if env.kind == "postgresql":
        return ['kind = "postgresql"', f"dsn = {_toml_str(env.cluster.dsn)}"]
    db = env.cluster
    if db.dbguard_password is None:
        raise DbguardError("MariaDB: no dbguard user yet (call MariaDB.grant_dbguard() first)")
    pw = env.workdir / "mysql.password"
    pw.write_text(db.dbguard_password + "\n")
    pw.chmod(0o600)
    return ['kind = "mysql"', f"socket = {_toml_str(db.socket)}", f"user = {_toml_str(db.DBGUARD_USER)}",
            f"password_file = {_toml_str(str(pw))}"]


def dbguard_config(env: ScenarioEnv, extra: str = "") -> str:
    """The scenario's config; `extra` is TOML appended as is (tables not already above)."""
    return "\n".join([
        "[general]",
        f"state_dir = {_toml_str(str(env.workdir / 'state'))}",
        "[[databases]]",
        'name = "scenario"',
        *_database_keys(env),
        "[pressure]",
        f"cgroup = {_toml_str(str(env.cgroup.path))}",
        "[audit]",
        f"path = {_toml_str(str(env.audit_path))}",
        "[metrics]",
        'listen = ""',
        "",
    ]) + extra


def read_audit(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def audit_names(rec: dict, pid: int) -> bool:
    """Whether an audit record is about process `pid` (its pid field, or "comm (pid N)" target)."""
    target = str(rec.get("target", ""))
    return rec.get("pid") == pid or re.search(rf"\bpid {pid}\b", target) is not None


def _tail(path: Path, n: int = 1) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return ""
    return " | ".join(lines[-n:])


@contextlib.contextmanager
def dbguard_guard(env: ScenarioEnv, *, ready_timeout: float = 10.0, settle: float = 1.0,
                  extra_args: tuple[str, ...] = (), extra_config: str = "") -> Iterator[None]:
    """`dbguard run --config FILE` outside the cgroup, until the block ends.

    Ready when its first audit record appears; a dbguard with nothing to do yet (no kill
    candidates before the hogs start) may write none, so one still running after
    `ready_timeout` seconds counts as ready too.
    """
    cfg = env.workdir / "dbguard.toml"
    cfg.write_text(dbguard_config(env, extra_config))
    out = env.workdir / "dbguard.out"
    cmd = [sys.executable, "-c", "import sys; from dbguard.cli import main; sys.exit(main())",
           "run", "--config", str(cfg), *extra_args]
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while not read_audit(env.audit_path) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            time.sleep(settle)     # let it finish its first cycle (scores raised, BPF maps filled)
        if proc.poll() is not None:
            raise DbguardError(f"dbguard run exited with code {proc.returncode} before the test load: "
                               f"{_tail(out) or 'no output'}")
        env.log(f"dbguard active (pid {proc.pid}, {len(read_audit(env.audit_path))} audit records so far)")
        yield
        if proc.poll() is not None:
            env.log(f"dbguard exited early with code {proc.returncode}: {_tail(out)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        env.log(f"dbguard stopped (exit {proc.returncode}); last output: {_tail(out, 3) or 'none'}")


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
    if os.geteuid() != 0:
        raise DbguardError("the memory-pressure scenario needs root (memory cgroups, oom counters); "
                           "run it as root, e.g. sudo make demo")
    try:
        path, version = own_memory_cgroup()
    except RuntimeError as e:
        raise DbguardError(f"no memory cgroup controller: {e}") from None
    if not os.access(path, os.W_OK):
        raise DbguardError(f"cannot create memory cgroups under {path}: not writable; run as root "
                           "with the cgroup filesystem mounted read-write")
    for tool in ("pgbench",):
        if shutil.which(tool) is None:
            raise DbguardError(f"{tool} not found: install postgresql-contrib (apt-get install postgresql)")


def _postgres_pids(cg: MemoryCgroup, postmaster: int) -> dict[int, str]:
    """The postmaster and its children in the cgroup (by parentage, not by name), with titles."""
    out = {}
    for pid in cg.pids():
        proc = read_proc(pid)
        if proc is not None and postmaster in (proc.pid, proc.ppid):
            out[pid] = proc.cmdline
    return out


def _stop_procs(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def start_hogs(spec: HogSpec, cg: MemoryCgroup, watcher: Watcher, workdir: Path, hold: float,
               procs: list[subprocess.Popen]) -> list[subprocess.Popen]:
    """The hogs in the cgroup, `spec.stagger` s apart, each watched by pidfd ("hog i (pid N)")
    and appended to `procs` as it starts (the caller's cleanup sees every one); their output
    goes to workdir/hogI.out. They hold their memory for `hold` s."""
    for i in range(spec.count):
        with open(workdir / f"hog{i}.out", "wb") as out:      # the child keeps its own copy
            p = hog.spawn(spec.size, spec.step, spec.interval, hold=hold, preexec_fn=cg.preexec(), stdout=out)
        procs.append(p)
        watcher.watch_process(p.pid, f"hog {i} (pid {p.pid})")
        time.sleep(spec.stagger)
    return procs


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
                    audit_dir: str | os.PathLike | None = None,
                    port: int | None = None,
                    log: Callable[[str], None] | None = None) -> ScenarioResult:
    """Run the scenario once and report what happened. See the module docstring.

    pgbench runs `-S -c clients -T duration`; the hogs start `warmup` seconds in, so the
    backends have touched shared buffers, as on a server that has been up for a while.
    """
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
            cg = stack.enter_context(MemoryCgroup(load_limit))
            say(f"[{guard_name}] cgroup {cg.path} (limit {load_limit // MiB} MiB while loading)")
            cluster = stack.enter_context(PgCluster(port=port, settings={"shared_buffers": shared_buffers},
                                                    cgroup=cg))
            say(f"[{guard_name}] PostgreSQL up on port {cluster.port if hasattr(cluster, 'port') else '?'}; "
                f"pgbench -i -s {scale} ...")
            cluster.pgbench_init(scale)
            cg.set_limit(limit)
            say(f"[{guard_name}] dataset loaded; limit now {limit // MiB} MiB, usage {cg.usage() // MiB} MiB")
            postmaster = cluster.postmaster_pid()

            env = ScenarioEnv(cg, cluster, workdir, audit_path, lambda m: say(f"[{guard_name}] {m}"))
            stack.enter_context(guard_cm(env))

            t_bench = time.monotonic()
            pgbench = cluster.pgbench("-S", "-c", str(clients), "-j", str(min(clients, 2)),
                                      "-T", str(duration), "-P", "1", "--no-vacuum")
            say(f"[{guard_name}] pgbench -S -c {clients} -T {duration} running; hogs in {warmup:g} s")
            time.sleep(warmup)

            t0 = time.monotonic()
            watcher = Watcher(cg, t0, kills_until=t_bench + duration)
            watcher.note("pgbench started", at=t_bench)
            pg_pids = _postgres_pids(cg, postmaster)
            for pid, title in pg_pids.items():
                watcher.watch_process(pid, "postmaster" if pid == postmaster else f"postgres pid {pid} ({title})")
            watcher.start()
            watcher.note(f"starting {hogs} hogs of {hog_size // MiB} MiB (usage {cg.usage() // MiB} MiB)")
            start_hogs(HogSpec(hogs, hog_size, step, step_interval, hog_stagger), cg, watcher, workdir,
                       hold=duration + 60, procs=hog_procs)
            say(f"[{guard_name}] {hogs} hogs started")

            try:
                stdout, stderr = pgbench.communicate(timeout=duration + 60)
            except subprocess.TimeoutExpired:
                pgbench.kill()
                stdout, stderr = pgbench.communicate()
            watcher.note(f"pgbench finished (exit {pgbench.returncode})")
            time.sleep(1.0)      # a postmaster mid-recovery needs a moment to answer or to give up
            survived = _postmaster_alive(postmaster) and cluster.is_up()
            watcher.stop()
            # exit codes before our own cleanup SIGKILLs the survivors
            hog_exits = [p.poll() for p in hog_procs]
            _stop_procs(hog_procs)

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
                audit=read_audit(audit_path),
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
            _stop_procs(hog_procs)
        kmsg.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _postmaster_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)      # signal 0: existence check only, nothing is delivered
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _safe(fn: Callable[[], int | None]) -> int | None:
    try:
        return fn()
    except Exception:
        return None


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")
