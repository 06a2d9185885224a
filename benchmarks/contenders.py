"""The contenders: what a user would otherwise run, and dbguard's two paths.

Each contender is a guard for lab.scenario (ScenarioEnv -> context manager), entered after
the database is up and the data set loaded, left after the load ends. A contender writes
what it could not apply on this host into `notes`, so the report says it plainly.

    none          the kernel default: nothing but the kernel OOM killer
    pg-documented PostgreSQL's documented Linux setup: postmaster oom_score_adj=-1000,
                  children reset to 0 (PG_OOM_ADJUST_FILE / PG_OOM_ADJUST_VALUE=0)
    earlyoom      the Debian earlyoom daemon with the settings a DBA would pick
    dbguard-user  `dbguard run` with [bpf] enabled = false
    dbguard-bpf   `dbguard run` with [bpf] enabled = true
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from lab.scenario import ScenarioEnv, dbguard_guard

Guard = Callable[[ScenarioEnv], ContextManager[None]]

# earlyoom as /etc/default/earlyoom suggests it, with the database spared by name: its
# defaults (-m 10 -s 10: act below 10 % MemAvailable, and swap below 10 %, which holds on a
# host without swap) plus --avoid, the one knob a DBA would add.
EARLYOOM_ARGS = ("-r", "1", "--avoid", "(^|/)(postgres|postmaster)$")


@dataclass
class Contender:
    name: str
    what: str                       # one line for the report
    guard: Callable[["Contender", ScenarioEnv], ContextManager[None]]
    is_dbguard: bool = False
    bpf: bool = False
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
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(value))
        return None
    except PermissionError:
        return "EACCES (lowering needs CAP_SYS_RESOURCE, which this host lacks)"
    except OSError as e:
        return e.strerror or str(e)


def _read_score(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError):
        return None


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
        c.notes.append(f"postmaster oom_score_adj=-1000 NOT applied: {why}; it stays at {_read_score(pm)}")
    else:
        c.notes.append("postmaster oom_score_adj=-1000 applied")
    children = [p for p in env.cgroup.pids() if _ppid(p) == pm]
    failed = [p for p in children if _write_score(p, 0)]
    c.notes.append(f"children reset to oom_score_adj=0: {len(children) - len(failed)} of {len(children)} "
                   "(new children inherit the postmaster's score"
                   + (", 0 here, so the reset changes nothing)" if why else ")"))
    try:
        yield
    finally:
        if not why:
            _write_score(pm, 0)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


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
    with open(out, "wb") as f:
        proc = subprocess.Popen([exe, *EARLYOOM_ARGS], stdout=f, stderr=subprocess.STDOUT,
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
        c.notes.append(f"earlyoom {' '.join(EARLYOOM_ARGS)}: {len(kills)} kill(s)"
                       + (f" {kills[:3]}" if kills else "")
                       + (f"; lowest MemAvailable it saw {low[0]} of {low[1]} MiB (it acts below 10 %): "
                          "it reads system-wide memory only, not the memory cgroup" if low else ""))


# --- dbguard ------------------------------------------------------------------------------------

def _dbguard(bpf: bool):
    @contextlib.contextmanager
    def guard(c: Contender, env: ScenarioEnv) -> Iterator[None]:
        extra = f"[bpf]\nenabled = {'true' if bpf else 'false'}\n"
        with dbguard_guard(env, extra_config=extra):
            yield
    return guard


def all_contenders() -> dict[str, Contender]:
    return {c.name: c for c in (
        Contender("none", "kernel default: no guard, the kernel OOM killer alone", _none),
        Contender("pg-documented", "PostgreSQL docs: postmaster oom_score_adj=-1000, children reset to 0",
                  _pg_documented),
        Contender("earlyoom", f"earlyoom 1.7 {' '.join(EARLYOOM_ARGS)} (defaults -m 10 -s 10)", _earlyoom),
        Contender("dbguard-user", "dbguard run, [bpf] enabled = false (user-space path only)",
                  _dbguard(False), is_dbguard=True),
        Contender("dbguard-bpf", "dbguard run, [bpf] enabled = true (user space + in-kernel path)",
                  _dbguard(True), is_dbguard=True, bpf=True),
    )}


def dbguard_available() -> str | None:
    """None when `dbguard run` exists in this checkout, else why not."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "dbguard" / "daemon.py").exists() or not (repo / "dbguard" / "cli.py").exists():
        return "dbguard/daemon.py or dbguard/cli.py not in this checkout yet: `dbguard run` cannot start"
    return None


# --- sampling: memory, pressure, the guard's own cost ------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int | None:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])        # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


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


def find_guard_pid(marker: str) -> int | None:
    """The process whose command line names `marker` (the guard's config or work dir)."""
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace"):
                return int(name)
    return None


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
                    self.guard_pid = find_guard_pid(self.marker)
                if self.guard_pid:
                    ticks = _cpu_ticks(self.guard_pid)
                    s["guard_cpu_s"] = None if ticks is None else ticks / CLK_TCK
                    s["guard_rss_kib"] = _status_kib(self.guard_pid, "VmRSS")
                    hwm = _status_kib(self.guard_pid, "VmHWM")
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
