"""Which process is a database server: by fact, never by name.

The facts, for every kind: the server's pid file (in or named by its data directory) names
the pid; that process runs with the data directory as its working directory (PostgreSQL and
MySQL both chdir there); and, where the kind knows them, its executable lies under the
server's base directory, it is owned by the owner of the data directory, and it is the peer
of our own unix-socket connection. A process merely called postgres or mysqld has none of
these; a pid file left by a crash names a pid that is gone or runs elsewhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..sense.procfs import read_proc


@dataclass(frozen=True)
class Process:
    """What /proc says about one process that identity depends on."""

    pid: int
    exe: str       # resolved executable, " (deleted)" dropped (a server outlives its upgraded binary)
    cwd: str


class Unreadable(Exception):
    """/proc/PID/cwd or exe exists but is not ours to read (dbguard not root)."""


def pid_in_file(path: str) -> int:
    """The pid a pid file names (its first word). Raises OSError or ValueError."""
    with open(path) as f:
        words = f.read(4096).split()
    if not words:
        raise ValueError("empty pid file")
    return int(words[0])


def inspect(pid: int, root: str = "/proc") -> Process | None:
    """exe and cwd of `pid`; None when the process does not exist. Raises Unreadable."""
    base = f"{root}/{pid}"
    try:
        cwd = os.readlink(f"{base}/cwd")
        try:
            exe = os.readlink(f"{base}/exe").removesuffix(" (deleted)")
        except FileNotFoundError:
            exe = ""               # a zombie, or a fixture tree without one
    except FileNotFoundError:
        return None
    except PermissionError:
        raise Unreadable(pid) from None
    return Process(pid=pid, exe=exe, cwd=cwd)


def same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def server_pid(pid_file: str, datadir: str, **facts) -> tuple[int | None, str]:
    """(pid, "") when the pid file names the server of `datadir`, else (None, why not) in one line.
    `facts`: as for why_not_server."""
    try:
        pid = pid_in_file(pid_file)
    except (OSError, ValueError) as e:
        return None, f"cannot read pid file {pid_file}: {getattr(e, 'strerror', None) or e}"
    why = why_not_server(pid, datadir, **facts)
    return (None, why) if why else (pid, "")


def why_not_server(pid: int, datadir: str, *, exe_under: str = "", owner_of_datadir: bool = False,
                   peer_pid: int | None = None, trust_unreadable: bool = False) -> str:
    """'' when `pid` is the server of `datadir` by every fact asked for, else why not (one line).

    `trust_unreadable`: when /proc/PID/cwd is not ours to read (not root), the pid file is the
    best fact left; without it such a pid is refused.
    """
    if peer_pid is not None and peer_pid != pid:
        return f"pid file says {pid} but the socket peer is {peer_pid}"
    try:
        proc = inspect(pid)
    except Unreadable:
        return "" if trust_unreadable else (f"cannot check process {pid}: Permission denied (dbguard must run "
                                            "on the server's host, as root)")
    if proc is None:
        return f"process {pid} from the pid file does not exist"
    return mismatch(proc, datadir, exe_under=exe_under, owner_of_datadir=owner_of_datadir)


def mismatch(proc: Process, datadir: str, *, exe_under: str = "", owner_of_datadir: bool = False) -> str:
    """'' when `proc` runs as the server of `datadir`, else why not (one line)."""
    if not same_dir(proc.cwd, datadir):
        return f"process {proc.pid} does not run in the data directory {datadir}"
    if owner_of_datadir:
        status = read_proc(proc.pid)
        try:
            data_uid = os.stat(datadir).st_uid
        except OSError as e:
            return f"cannot check process {proc.pid}: {e.strerror} (dbguard must run on the server's host, as root)"
        if status is None:
            return f"process {proc.pid} from the pid file does not exist"
        if status.uid != data_uid:
            return f"process {proc.pid} is not owned by the owner of {datadir}"
    if exe_under and not proc.exe.startswith(os.path.normpath(exe_under).rstrip("/") + "/"):
        return f"process {proc.pid} runs {proc.exe or '(unreadable)'}, not a server under {exe_under}"
    return ""
