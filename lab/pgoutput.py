"""What PostgreSQL's tools say, parsed: pgbench's summary and -P progress lines, and the
server log's crashes and killed processes. Pure functions, tested on captured output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class PgbenchSummary:
    transactions_ok: int = 0
    transactions_failed: int = 0      # reported failed + one in-flight transaction per aborted client
    sessions_lost: int = 0            # clients that aborted (connection dropped, FATAL, ...)
    tps: float = 0.0                  # whole run, as pgbench reports it
    progress: list[tuple[float, float]] = field(default_factory=list)   # (seconds since start, tps)
    errors: list[str] = field(default_factory=list)                     # first few error lines
    exit_code: int | None = None


# One line per crash: the postmaster logs the first process of a crash at LOG ("server process
# (PID n) was terminated by signal 9") and the ones it takes down with it at DEBUG2 only;
# "reinitializing" follows a crash the server restarts from, not one it shuts down on (its
# startup process killed during recovery). Excerpts keep this line (crash_excerpt), and
# "terminating any other active server processes", the other once-per-crash line, they do not.
_CRASH_RE = re.compile(r"was terminated by signal")
_LOG_VICTIM_RE = re.compile(r"\(PID (\d+)\) was terminated by signal 9")
_PROGRESS_RE = re.compile(r"^progress: ([\d.]+) s, ([\d.]+) tps")
_ABORT_RE = re.compile(r"client \d+ .*aborted|client \d+ aborted")


def count_crash_recoveries(server_log: str) -> int:
    """The crashes the postmaster went through (each a crash recovery of the whole server)."""
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
