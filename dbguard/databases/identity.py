"""Which process is a database server: by fact, never by name.

The facts, for every kind: the server's pid file (in or named by its data directory) names
the pid; that process runs with the data directory as its working directory (PostgreSQL and
MySQL both chdir there); and, where the kind knows them, its executable lies under the
server's base directory, it is owned by the owner of the data directory, and it is the peer
of our own unix-socket connection. A process merely called postgres or mysqld has none of
these; a pid file left by a crash names a pid that is gone or runs elsewhere.

Without SQL (a refused login, a LOGIN-only role, a hung server) the endpoint alone finds the
server: the process holding the listening socket (databases/sockets.py), and for PostgreSQL
the socket's lock file. `Tracker` keeps what was found while that process lives.

A server in a container (namespaces.py) is checked by the same facts as its container sees
them: its files through the container's root, the pid in its pid file mapped to the host pid.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import DbguardError
from ..sense.procfs import live_start_time, read_proc
from .namespaces import HOST, Host, Namespace


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


def same_dir(a: str, b: str, ns: Host = HOST) -> bool:
    return ns.realpath(a) == ns.realpath(b)


def server_pid(pid_file: str, datadir: str, ns: Host = HOST, **facts) -> tuple[int | None, str]:
    """(host pid, "") when the pid file names the server of `datadir`, else (None, why not) in
    one line. `ns`: the server's namespaces (paths and the pid in the file are its own);
    `facts`: as for why_not_server."""
    try:
        named = pid_in_file(ns.path(pid_file))
    except (OSError, ValueError, DbguardError) as e:
        return None, f"cannot read pid file {pid_file}{ns.where()}: {getattr(e, 'strerror', None) or e}"
    pid = ns.host_pid(named)
    if pid is None:
        return None, f"process {named} from the pid file {pid_file} does not exist{ns.where()}"
    why = why_not_server(pid, datadir, ns=ns, **facts)
    return (None, why) if why else (pid, "")


def why_not_server(pid: int, datadir: str, *, exe_under: str = "", owner_of_datadir: bool = False,
                   peer_pid: int | None = None, trust_unreadable: bool = False, ns: Host = HOST) -> str:
    """'' when host pid `pid` is the server of `datadir` by every fact asked for, else why not
    (one line). `ns`: the namespaces `datadir` and `exe_under` are named in.

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
    return mismatch(proc, datadir, exe_under=exe_under, owner_of_datadir=owner_of_datadir, ns=ns)


def mismatch(proc: Process, datadir: str, *, exe_under: str = "", owner_of_datadir: bool = False,
             ns: Host = HOST) -> str:
    """'' when `proc` runs as the server of `datadir`, else why not (one line). /proc/PID/cwd and
    exe of a process in a container read as the container sees them, as `datadir` is named."""
    try:
        same = same_dir(proc.cwd, datadir, ns)
    except DbguardError as e:
        return f"cannot check process {proc.pid}: {e}"
    if not same:
        return f"process {proc.pid} does not run in the data directory {datadir}"
    if owner_of_datadir:
        status = read_proc(proc.pid)
        try:
            data_uid = os.stat(ns.path(datadir)).st_uid
        except OSError as e:
            return f"cannot check process {proc.pid}: {e.strerror} (dbguard must run on the server's host, as root)"
        if status is None:
            return f"process {proc.pid} from the pid file does not exist"
        if status.uid != data_uid:
            return f"process {proc.pid} is not owned by the owner of {datadir}"
    if exe_under and not proc.exe.startswith(os.path.normpath(exe_under).rstrip("/") + "/"):
        return f"process {proc.pid} runs {proc.exe or '(unreadable)'}, not a server under {exe_under}"
    return ""


# --- a server found from its endpoint, without SQL -------------------------------------------

@dataclass(frozen=True)
class Found:
    """A server identified by fact, or why none was."""

    pid: int | None
    data_directory: str = ""
    how: str = ""              # which fact named it, for explain and the log
    why_not: str = ""          # one line, when pid is None

    @property
    def ok(self) -> bool:
        return self.pid is not None


def show_endpoint(e: tuple) -> str:
    return f"socket {e[1]}" if e[0] == "unix" else f"{e[1]} port {e[2]}"


def _unix_inodes_in(ns: Namespace, path: str) -> set[int]:
    """Inodes of the sockets listening at the container's `path`: from the table of the
    container's network namespace (/proc/<pid>/net/unix), which names them as it bound them."""
    from . import sockets
    try:
        with open(f"/proc/{ns.anchor}/net/unix") as f:
            table = sockets.parse_unix(f.read())
        want = ns.realpath(path)
        return {inode for bound, inode in table.items() if bound == path or ns.realpath(bound) == want}
    except (OSError, DbguardError):
        return set()


def socket_holder(endpoint: tuple, proc_root: str = "/proc", ns: Host = HOST) -> tuple[int | None, str]:
    """The process listening at ("unix", path) or ("tcp", host, port): (pid, "") or (None, why
    not). The kernel's socket tables say who holds the listening socket: no login needed.
    `ns`: the container a unix socket path is named in."""
    from . import sockets
    if endpoint[0] == "unix" and isinstance(ns, Namespace):
        inodes = _unix_inodes_in(ns, endpoint[1])
    elif endpoint[0] == "unix":
        inodes = sockets.unix_inodes(endpoint[1], proc_root)
    else:
        inodes = sockets.tcp_inodes(endpoint[1], int(endpoint[2]), proc_root)
    where = show_endpoint(endpoint)
    if not inodes:
        return None, f"nothing listens on {where}"
    held = sockets.holders(inodes, proc_root=proc_root)
    if not held:
        return None, f"no process of ours holds the socket listening on {where} (dbguard must run as root, " \
                     "in the server's pid and network namespace)"
    pid = sockets.eldest(held, proc_root)
    if pid is None:
        return None, f"several unrelated processes hold the socket listening on {where}: {sorted(held)}"
    return pid, ""


class Tracker:
    """The server last found, kept while that very process lives (pid and start time: a
    reused pid is not it); looked for again when it is gone, at most every `retry` seconds
    while none is found (finding by TCP port reads every process's descriptors)."""

    def __init__(self, find: Callable[[], Found], retry: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._find = find
        self.retry = retry
        self._clock = clock
        self._last: Found = Found(None, why_not="not looked for yet")
        self._start: int | None = None
        self._tried = float("-inf")

    def get(self) -> Found:
        last = self._last
        if last.pid is not None and live_start_time(last.pid) == self._start and self._start is not None:
            return last
        now = self._clock()
        if last.pid is None and now - self._tried < self.retry:
            return last
        self._tried = now
        found = self._find()
        self._start = live_start_time(found.pid) if found.pid is not None else None
        if found.pid is not None and self._start is None:        # gone while we looked
            found = Found(None, why_not=f"process {found.pid} exited while being identified")
        self._last = found
        return found

    def forget(self) -> None:
        """Look again at the next get() (the facts changed: SQL named another data directory)."""
        self._last, self._tried = Found(None, why_not="not looked for yet"), float("-inf")


def degraded(stats) -> dict[str, str]:
    """Database name -> one line, for every configured database whose server no fact
    identifies (Snapshot.databases): what that means and how to fix it. Pure."""
    return {s.name: f"{s.kind} {s.name}: server not identified ({s.identity or s.error or 'no facts'}); every "
                    "process running a database server executable is shielded instead. Fix: run dbguard as root "
                    "on the database's host (same pid and network namespace) and check the endpoint of "
                    f"[[databases]] {s.name}"
            for s in stats if s.server_pid is None}
