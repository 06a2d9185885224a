"""The contenders: what a user would otherwise run, and dbguard's two paths.

Each contender is a guard for lab.scenario (ScenarioEnv -> context manager), entered after
the database is up and the data set loaded, left after the load ends. A contender writes
what it could not apply on this host into `notes`, so the report says it plainly.

    none          the kernel default: nothing but the kernel OOM killer
    pg-documented PostgreSQL's documented Linux setup: postmaster oom_score_adj=-1000,
                  children reset to 0 (PG_OOM_ADJUST_FILE / PG_OOM_ADJUST_VALUE=0)
    mariadb-documented  what Debian's mariadb.service ships: OOMScoreAdjust=-600 (there as a
                  commented-out suggestion) and Restart=on-abnormal with RestartSec=5s
    earlyoom      the Debian earlyoom daemon with the settings a DBA would pick
    dbguard-user  `dbguard run` with [bpf] enabled = false
    dbguard-bpf   `dbguard run` with [bpf] enabled = true
"""
from __future__ import annotations

import contextlib
import functools
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from lab.procs import CLK_TCK, cpu_ticks, find_by_cmdline, oom_score_adj, ppid, set_oom_score_adj, status_kib
from lab.scenario import ScenarioEnv, dbguard_guard

Guard = Callable[[ScenarioEnv], ContextManager[None]]

# earlyoom as /etc/default/earlyoom suggests it, with the database spared by name: its
# defaults (-m 10 -s 10: act below 10 % MemAvailable, and swap below 10 %, which holds on a
# host without swap) plus --avoid, the one knob a DBA would add.
EARLYOOM_AVOID = {"postgresql": "(^|/)(postgres|postmaster)$", "mysql": "(^|/)(mariadbd|mysqld)$"}


def earlyoom_args(kind: str) -> tuple[str, ...]:
    return ("-r", "1", "--avoid", EARLYOOM_AVOID[kind])


# Debian 12's /lib/systemd/system/mariadb.service (MariaDB 10.11): "Kernels like killing
# mariadbd when out of memory because its big. Lets temper that preference a little."
# followed by "# OOMScoreAdjust=-600" (commented out), and, active, Restart=on-abnormal
# (a death by signal, e.g. an OOM kill, restarts the server) with RestartSec=5s.
MARIADB_UNIT_SCORE = -600
MARIADB_UNIT_RESTART_SEC = 5.0


@dataclass
class Contender:
    name: str
    what: str                       # one line for the report
    guard: Callable[["Contender", ScenarioEnv], ContextManager[None]]
    is_dbguard: bool = False
    bpf: bool = False
    databases: tuple[str, ...] = ("postgresql", "mysql")   # the scenarios' database kinds it applies to
    notes: list[str] = field(default_factory=list)      # things not applied / not seen, per run

    def for_env(self) -> Guard:
        g = functools.partial(self.guard, self)
        g.__name__ = self.name          # lab.scenario names the run after it
        return g


# --- kernel default ----------------------------------------------------------------------------

@contextlib.contextmanager
def _none(c: Contender, env: ScenarioEnv) -> Iterator[None]:
    yield


# --- PostgreSQL's documented setup -------------------------------------------------------------

def _write_score(pid: int, value: int) -> str | None:
    """None when written, else why not (one line)."""
    why = set_oom_score_adj(pid, value)
    if why and why.startswith("EACCES"):
        return "EACCES (lowering needs CAP_SYS_RESOURCE, which this host lacks)"
    return why


@contextlib.contextmanager
def _pg_documented(c: Contender, env: ScenarioEnv) -> Iterator[None]:
    # The docs set -1000 in the service script before the postmaster starts, and
    # PG_OOM_ADJUST_FILE=/proc/self/oom_score_adj PG_OOM_ADJUST_VALUE=0 in its environment so
    # each child writes 0 to its own file right after fork. The cluster is already up here,
    # so we do the same writes from outside: the postmaster, then every child it has now;
    # children forked later inherit the postmaster's score, which is what the reset fixes up.
    pm = env.cluster.postmaster_pid()
    why = _write_score(pm, -1000)
    if why:
        c.notes.append(f"postmaster oom_score_adj=-1000 NOT applied: {why}; it stays at {oom_score_adj(pm)}")
    else:
        c.notes.append("postmaster oom_score_adj=-1000 applied")
    children = [p for p in (env.cluster.cgroup or env.cgroup).pids() if ppid(p) == pm]   # its own sub-group
    failed = [p for p in children if _write_score(p, 0)]
    c.notes.append(f"children reset to oom_score_adj=0: {len(children) - len(failed)} of {len(children)} "
                   "(new children inherit the postmaster's score"
                   + (", 0 here, so the reset changes nothing)" if why else ")"))
    try:
        yield
    finally:
        if not why:
            _write_score(pm, 0)


# --- MariaDB as Debian's systemd unit runs it -----------------------------------------------------

class _Supervisor(threading.Thread):
    """systemd's Restart=on-abnormal for one lab.mariadb.MariaDB: when mariadbd dies by a signal,
    start it again after RestartSec on the same datadir (in the same cgroup), with the unit's
    score; an exit with a code is not restarted (on-abnormal). Starts go to db.starts."""

    def __init__(self, c: Contender, env: ScenarioEnv, score_note):
        super().__init__(name="mariadb-supervisor", daemon=True)
        self.c, self.db, self.env, self.score_note = c, env.cluster, env, score_note
        self.halt = threading.Event()
        self.restarts = 0

    def run(self) -> None:
        while not self.halt.is_set():
            proc = self.db.proc
            if proc is None:
                return
            try:
                rc = proc.wait(0.1)
            except subprocess.TimeoutExpired:
                continue
            if rc >= 0:
                self.c.notes.append(f"Restart=on-abnormal: mariadbd exited with code {rc}: not restarted")
                return
            self.env.log(f"mariadbd (pid {proc.pid}) killed by signal {-rc}; restart in "
                         f"{MARIADB_UNIT_RESTART_SEC:g} s (Restart=on-abnormal)")
            if self.halt.wait(MARIADB_UNIT_RESTART_SEC):
                return
            try:
                pid = self.db.respawn()
            except Exception as e:        # it may be killed again while it recovers: try again
                self.env.log(f"restart failed: {str(e)[:200]}")
                if self.db.proc is not None and self.db.proc.poll() is None:
                    return                # running but not answering: leave it, as systemd would
                continue
            self.restarts += 1
            self.score_note(pid)
            self.env.log(f"mariadbd restarted (pid {pid})")

    def stop(self) -> None:
        self.halt.set()
        self.join(self.db.start_timeout + 10)


@contextlib.contextmanager
def _mariadb_documented(c: Contender, env: ScenarioEnv) -> Iterator[None]:
    # systemd writes OOMScoreAdjust to the service's process before exec, so mariadbd and any
    # restarted mariadbd carry it; the server is up here, so we write it from outside, once
    # per start. As root without CAP_SYS_RESOURCE the kernel refuses to lower a score.
    refused: list[str] = []

    def apply(pid: int) -> None:
        why = _write_score(pid, MARIADB_UNIT_SCORE)
        if why:
            refused.append(why)
        elif not refused:
            c.notes.append(f"mariadbd oom_score_adj={MARIADB_UNIT_SCORE} applied")
    pid = env.cluster.pid()
    apply(pid)
    if refused:
        c.notes.append(f"mariadbd oom_score_adj={MARIADB_UNIT_SCORE} NOT applied: {refused[0]}; "
                       f"it stays at {oom_score_adj(pid)}")
    sup = _Supervisor(c, env, apply)
    sup.start()
    try:
        yield
    finally:
        sup.stop()
        c.notes.append(f"Restart=on-abnormal (RestartSec={MARIADB_UNIT_RESTART_SEC:g}s): "
                       f"{sup.restarts} restart(s) of mariadbd")


# --- earlyoom ----------------------------------------------------------------------------------

_EO_KILL_RE = re.compile(r"sending (SIGTERM|SIGKILL) to process (\d+) \"?([^\"]*)\"?")
_EO_AVAIL_RE = re.compile(r"mem avail:\s+(\d+) of\s+(\d+) MiB")


def earlyoom_kills(text: str) -> list[str]:
    return [f"{m.group(1)} pid {m.group(2)} ({m.group(3).strip()})" for m in _EO_KILL_RE.finditer(text)]


def earlyoom_min_avail(text: str) -> tuple[int, int] | None:
    """(lowest MemAvailable MiB it reported, total MiB)."""
    vals = [(int(m.group(1)), int(m.group(2))) for m in _EO_AVAIL_RE.finditer(text)]
    return min(vals) if vals else None


@contextlib.contextmanager
def _earlyoom(c: Contender, env: ScenarioEnv) -> Iterator[None]:
    exe = shutil.which("earlyoom")
    if exe is None:
        raise RuntimeError("earlyoom not found: apt-get install earlyoom (scripts/setup-host.sh does it)")
    out = env.workdir / "earlyoom.out"
    args = earlyoom_args(env.kind)
    with open(out, "wb") as f:
        proc = subprocess.Popen([exe, *args], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while "mem avail" not in out.read_text(errors="replace") and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"earlyoom exited with {proc.returncode}: {out.read_text()[-300:]}")
            time.sleep(0.05)
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = out.read_text(errors="replace")
        kills = earlyoom_kills(text)
        low = earlyoom_min_avail(text)
        c.notes.append(f"earlyoom {' '.join(args)}: {len(kills)} kill(s)"
                       + (f" {kills[:3]}" if kills else "")
                       + (f"; lowest MemAvailable it saw {low[0]} of {low[1]} MiB (it acts below 10 %): "
                          "it reads system-wide memory only, not the memory cgroup" if low else ""))


# --- dbguard ------------------------------------------------------------------------------------

def _dbguard(bpf: bool):
    @contextlib.contextmanager
    def guard(c: Contender, env: ScenarioEnv) -> Iterator[None]:
        with dbguard_guard(env, extra_config={"bpf": {"enabled": bpf}}) as run:
            yield run
    return guard


def all_contenders() -> dict[str, Contender]:
    return {c.name: c for c in (
        Contender("none", "kernel default: no guard, the kernel OOM killer alone", _none),
        Contender("pg-documented", "PostgreSQL docs: postmaster oom_score_adj=-1000, children reset to 0",
                  _pg_documented, databases=("postgresql",)),
        Contender("mariadb-documented", f"Debian's mariadb.service: mariadbd oom_score_adj={MARIADB_UNIT_SCORE} "
                  "(the unit's commented-out OOMScoreAdjust), Restart=on-abnormal after "
                  f"RestartSec={MARIADB_UNIT_RESTART_SEC:g}s (active in the unit)", _mariadb_documented,
                  databases=("mysql",)),
        Contender("earlyoom", "earlyoom 1.7 -r 1 --avoid (the database server by name: "
                  + " or ".join(f"`{v}`" for v in EARLYOOM_AVOID.values()) + "; defaults -m 10 -s 10)",
                  _earlyoom),
        Contender("dbguard-user", "dbguard run, [bpf] enabled = false (user-space path only)",
                  _dbguard(False), is_dbguard=True),
        Contender("dbguard-bpf", "dbguard run, [bpf] enabled = true (user space + in-kernel path)",
                  _dbguard(True), is_dbguard=True, bpf=True),
    )}


def for_database(names: list[str], kind: str) -> list[str]:
    """Those of `names` that apply next to a database of `kind` ("postgresql" or "mysql")."""
    contenders = all_contenders()
    return [n for n in names if kind in contenders[n].databases]


def dbguard_available() -> str | None:
    """None when `dbguard run` exists in this checkout, else why not."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "dbguard" / "daemon.py").exists() or not (repo / "dbguard" / "cli.py").exists():
        return "dbguard/daemon.py or dbguard/cli.py not in this checkout yet: `dbguard run` cannot start"
    return None


# --- sampling: memory, pressure, the guard's own cost ------------------------------------------

def host_psi() -> tuple[float, float]:
    """(some avg10, full avg10) of /proc/pressure/memory: host-wide, but on this machine the
    only memory pressure is the scenario's cgroup, so it is that cgroup's stall."""
    some = full = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/pressure/memory").read_text().splitlines():
            kind, rest = line.split(None, 1)
            avg10 = float(rest.split()[0].split("=")[1])
            if kind == "some":
                some = avg10
            else:
                full = avg10
    return some, full


class Sampler(threading.Thread):
    """Every `period` s: cgroup usage, host PSI, and the guard process's CPU and RSS."""

    def __init__(self, env: ScenarioEnv, guard_marker: str | None, period: float = 0.25):
        super().__init__(name="bench-sampler", daemon=True)
        self.env, self.marker, self.period = env, guard_marker, period
        self.samples: list[dict] = []        # t (monotonic), usage, psi_some, psi_full, guard_cpu_s, guard_rss
        self.guard_pid: int | None = None
        self.guard_hwm_kib: int | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                some, full = host_psi()
                s = {"t": t, "usage": self.env.cgroup.usage(), "psi_some": some, "psi_full": full}
                if self.marker and self.guard_pid is None:
                    self.guard_pid = find_by_cmdline(self.marker)
                if self.guard_pid:
                    ticks = cpu_ticks(self.guard_pid)
                    s["guard_cpu_s"] = None if ticks is None else ticks / CLK_TCK
                    s["guard_rss_kib"] = status_kib(self.guard_pid, "VmRSS")
                    hwm = status_kib(self.guard_pid, "VmHWM")
                    if hwm:
                        self.guard_hwm_kib = hwm
                self.samples.append(s)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def guard_cpu_pct(samples: list[dict], start: float, end: float) -> float | None:
    """The guard's CPU use between two monotonic times, percent of one core."""
    pts = [(s["t"], s["guard_cpu_s"]) for s in samples
           if s.get("guard_cpu_s") is not None and start <= s["t"] <= end]
    if len(pts) < 2 or pts[-1][0] - pts[0][0] <= 0:
        return None
    return 100.0 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def sampled(contender: Contender, sink: dict) -> Guard:
    """The contender's guard with a Sampler around it; the sampler lands in sink["sampler"]."""
    inner = contender.for_env()

    @contextlib.contextmanager
    def guard(env: ScenarioEnv) -> Iterator[None]:
        marker = str(env.workdir / "dbguard.toml") if contender.is_dbguard else None
        sampler = Sampler(env, marker)
        sink["sampler"] = sampler
        sink["guard_entered"] = time.monotonic()
        sampler.start()
        try:
            with inner(env):
                sink["guard_ready"] = time.monotonic()
                yield
        finally:
            sampler.stop()
    guard.__name__ = contender.name
    return guard
