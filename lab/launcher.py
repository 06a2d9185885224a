"""`dbguard run` as a child process, the one way tests, the demo and benchmarks start it.

    run = DbguardRun(workdir, config)            # writes workdir/dbguard.toml, starts it
    run.wait_protecting()                        # its "start" audit record: it protects now
    run.audit(); run.output(); run.reload()      # audit records, stdout+stderr, SIGHUP
    rc = run.stop()                              # SIGTERM, wait, exit code

The config is a dict as in the TOML file ({"general": {...}, "databases": [{...}]}); `base_config`
gives the keys every lab run sets (state dir and audit log in the work dir, no metrics port).
Output goes to workdir/dbguard.out. The process runs in its own session, from the repository,
with this interpreter, so it is the checkout's dbguard that runs.
"""
from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from dbguard.errors import DbguardError
from lab import pace

REPO = Path(__file__).resolve().parent.parent
DBGUARD = [sys.executable, "-c", "import sys; from dbguard.cli import main; sys.exit(main())"]


def dbguard_command(*args: str) -> list[str]:
    """argv for `dbguard ARGS...` from this checkout (run it with cwd=REPO)."""
    return [*DBGUARD, *args]


# --- config ------------------------------------------------------------------------------------

def base_config(workdir: Path, cgroup: str | Path | None = None) -> dict:
    """What every lab run sets: state and audit log in `workdir`, no metrics listener, and the
    watched memory cgroup when given."""
    cfg: dict = {"general": {"state_dir": str(workdir / "state")},
                 "audit": {"path": str(workdir / "audit.jsonl")},
                 "metrics": {"listen": ""}}
    if cgroup is not None:
        cfg["pressure"] = {"cgroup": str(cgroup)}
    return cfg


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)        # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}: {v!r}")


def _is_tables(v) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(path: str, table: dict, header: str) -> list[str]:
    lines = [header] if header else []
    lines += [f"{k} = {_value(v)}" for k, v in table.items() if not isinstance(v, dict) and not _is_tables(v)]
    for k, v in table.items():
        sub = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            lines += _table(sub, v, f"[{sub}]")
        elif _is_tables(v):
            for item in v:
                lines += _table(sub, item, f"[[{sub}]]")
    return lines


def toml(config: dict) -> str:
    """TOML text for a config dict: tables, arrays of tables ([[databases]], [[policy.rules]]),
    strings, numbers, booleans and lists of them."""
    return "\n".join(_table("", config, "")) + "\n"


def audit_records(path: Path | str | None) -> list[dict]:
    """The JSON lines of an audit log (a torn last line is left out; none if it is missing)."""
    try:
        text = Path(path).read_text() if path else ""
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


# --- the process ---------------------------------------------------------------------------------

class DbguardRun:
    """One `dbguard run --config workdir/dbguard.toml ARGS...`, started at construction.
    `command` replaces this checkout's dbguard with another one's argv (an installed wheel or .deb)."""

    def __init__(self, workdir: Path, config: dict, *args: str, command: list[str] | None = None):
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "dbguard.toml"
        self.out_path = self.workdir / "dbguard.out"
        self.write_config(config)
        self.audit_path = Path(config.get("audit", {}).get("path") or self.workdir / "audit.jsonl")
        with open(self.out_path, "wb") as out:      # the child keeps its own copy of the fd
            self.spawned = time.monotonic()
            argv = [*(command or DBGUARD), "run", "--config", str(self.config_path), *args]
            self.proc = subprocess.Popen(argv,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def running(self) -> bool:
        return self.proc.poll() is None

    def write_config(self, config: dict) -> None:
        """(Re)write the config file; a reload() makes the running dbguard read it."""
        self.config_path.write_text(toml(config))

    def audit(self, since: float | None = None) -> list[dict]:
        """Its audit records; with `since` (a time.time()), only those written at or after it."""
        records = audit_records(self.audit_path)
        return records if since is None else [r for r in records if float(r.get("ts", 0)) >= since]

    def output(self, limit: int | None = 3000) -> str:
        """The end of its stdout and stderr (limit None: all of it)."""
        try:
            text = self.out_path.read_text(errors="replace")
            return text if limit is None else text[-limit:]
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 1) -> str:
        """Its last non-empty output lines, joined with " | " (for one-line messages)."""
        return " | ".join([ln for ln in self.output(20000).splitlines() if ln.strip()][-lines:])

    # --- waiting -------------------------------------------------------------------------------
    def wait_for(self, cond: Callable[[], object], timeout: float, what: str, poll: float = 0.1) -> None:
        """Until cond() holds; DbguardError if dbguard exits first or `timeout` s pass (stretched
        by the machine's slowdown, lab/pace.py)."""
        timeout = pace.bound(timeout)
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise DbguardError(f"dbguard run exited with code {self.proc.returncode} while waiting for "
                                   f"{what}: {self.tail(3) or 'no output'}")
            if time.monotonic() > deadline:
                raise DbguardError(f"dbguard run: no {what} within {timeout:g} s; audit: {self.audit()[-5:]}; "
                                   f"output: {self.tail(5) or 'none'}")
            time.sleep(poll)

    def wait_record(self, pred: Callable[[dict], bool], timeout: float, what: str, poll: float = 0.1) -> dict:
        """The first audit record for which pred() holds (see wait_for)."""
        found: list[dict] = []

        def seen() -> bool:
            found[:] = [r for r in self.audit() if pred(r)][:1]
            return bool(found)
        self.wait_for(seen, timeout, what, poll)
        return found[0]

    def wait_protecting(self, timeout: float = 60.0, settle: float = 0.0, poll: float = 0.05,
                        kernel: bool = True) -> float:
        """Until its "start" audit record (written once the config is loaded, the databases
        reached and memory locked: the user-space path protects from then on) and, with
        `kernel`, when that record says the kernel path is still compiling or loading, until
        that path's own record (wait_kernel_path); then `settle` s more for its first cycles
        (scores raised, BPF maps filled). Seconds from spawn to the "start" record."""
        from dbguard.kernel.attach import COMPILING, LOADING
        start = self.wait_record(lambda r: r.get("action") == "start", timeout, 'its "start" audit record', poll)
        ready = time.monotonic() - self.spawned
        if kernel and any(s in start.get("reason", "") for s in (COMPILING, LOADING)):
            self.wait_kernel_path(timeout, poll)
        if settle:
            time.sleep(settle)
            if self.proc.poll() is not None:
                raise DbguardError(f"dbguard run exited with code {self.proc.returncode} right after starting: "
                                   f"{self.tail(3) or 'no output'}")
        return ready

    def wait_kernel_path(self, timeout: float = 60.0, poll: float = 0.05) -> tuple[float, dict]:
        """Until the kernel path's record: "bpf_attached", or "bpf_failed" when dbguard goes on
        without it (with [bpf] enabled = true it exits: DbguardError). (Seconds from spawn to
        it, the record.)"""
        rec = self.wait_record(lambda r: r.get("action") in ("bpf_attached", "bpf_failed"), timeout,
                               'its "bpf_attached" audit record', poll)
        return time.monotonic() - self.spawned, rec

    # --- signals -------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: dbguard rereads its config file."""
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and its exit code. One that does not stop within `timeout` s is SIGKILLed
        and DbguardError says so."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise DbguardError(f"dbguard did not stop within {timeout:g} s of SIGTERM; output: "
                                   f"{self.tail(3) or 'none'}") from None
        return self.proc.returncode

    def __enter__(self) -> "DbguardRun":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.stop()
        else:                       # the first error is the story: do not hide it behind this one
            with contextlib.suppress(DbguardError):
                self.stop()
