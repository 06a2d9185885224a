"""Servers in other mount and pid namespaces (containers, pods): where their files and pids are.

A server in a container names everything as its container sees it: postmaster.pid says
"/var/lib/postgresql/data" and pid 7, `@@pid_file` says "/run/mysqld/mysqld.pid", the
socket lies in "/var/run/postgresql". On the host none of these paths exists (or a different
file does), and pid 7 is someone else. The kernel gives root the way in:

- /proc/<pid>/root is the root directory of that process's mount namespace, so its files are
  under "/proc/<pid>/root/<path>" (resolved here inside that root: a symbolic link such as
  "/var/run -> /run" means the container's /run, never the host's);
- /proc/<pid>/status line "NSpid:" lists a process's pid in each pid namespace it is in, the
  host's first and its own (what it writes into its pid file) last;
- SO_PEERCRED and every /proc listing already give host pids.

`Host` is the identity of all this for a server that shares dbguard's namespaces; `Namespace`
is a container's, anchored on one of its host pids. `Locator` finds (and re-finds, after the
container restarted) the anchor from the `namespace_of` key of [[databases]].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..errors import DbguardError

PROC = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup/"
MAX_LINKS = 40                 # as the kernel's own path walk (ELOOP)
MAX_CGROUP_PIDS = 100_000      # a cgroup named in namespace_of is walked no further than this


# --- pure -------------------------------------------------------------------------------------

def parse_nspid(status_text: str) -> list[int]:
    """The "NSpid:" pids of a /proc/PID/status text, outermost first; [] when absent."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:] if x.isdigit()]
    return []


def resolve_in_root(path: str, readlink: Callable[[str], str | None]) -> str:
    """`path` (absolute, as seen inside a root) with every symbolic link followed inside that
    root, as chroot would: an absolute link starts again at the root, ".." stops at it.
    `readlink(p)` gives the target of the link at root-relative `p`, None when it is no link.
    Raises DbguardError after MAX_LINKS links (a loop)."""
    if not path.startswith("/"):
        raise DbguardError(f"{path!r}: a path inside a container must be absolute")
    todo = [c for c in path.split("/") if c]
    done: list[str] = []
    links = 0
    while todo:
        c = todo.pop(0)
        if c == ".":
            continue
        if c == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join(done + [c])
        target = readlink(here)
        if target is None:
            done.append(c)
            continue
        links += 1
        if links > MAX_LINKS:
            raise DbguardError(f"{path}: too many levels of symbolic links inside the container")
        if target.startswith("/"):
            done = []
        todo = [t for t in target.split("/") if t] + todo
    return "/" + "/".join(done)


# --- reading /proc ----------------------------------------------------------------------------

def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def nspid(pid: int) -> list[int]:
    """NSpid of a host pid, outermost first; [] when it is gone."""
    try:
        return parse_nspid(_read(f"{PROC}/{pid}/status"))
    except OSError:
        return []


class Host:
    """dbguard's own namespaces: paths and pids are what they say."""

    anchor: int | None = None

    def path(self, p: str) -> str:
        return p

    def realpath(self, p: str) -> str:
        return os.path.realpath(p)

    def host_pid(self, ns_pid: int) -> int | None:
        return ns_pid

    def ns_pid(self, host_pid: int) -> int | None:
        return host_pid

    def pid_map(self) -> dict[int, int] | None:
        """ns pid -> host pid for every process in the namespace; None: they are the same."""
        return None

    def alive(self) -> bool:
        return True

    def where(self) -> str:
        return ""


HOST = Host()


@dataclass(frozen=True)
class Namespace(Host):
    """The mount and pid namespaces of host process `anchor` (any process of the container)."""

    anchor: int
    mnt: str = ""          # readlink /proc/<anchor>/ns/mnt when found: a reused pid is noticed
    pidns: str = ""        # readlink /proc/<anchor>/ns/pid

    @classmethod
    def of(cls, pid: int) -> "Namespace | None":
        """The namespaces of host pid `pid`; None when it is gone."""
        mnt, pidns = _link(f"{PROC}/{pid}/ns/mnt"), _link(f"{PROC}/{pid}/ns/pid")
        if mnt is None or pidns is None:
            return None
        return cls(pid, mnt, pidns)

    @property
    def root(self) -> str:
        return f"{PROC}/{self.anchor}/root"

    def realpath(self, p: str) -> str:
        return resolve_in_root(p, lambda q: _link(self.root + q))

    def path(self, p: str) -> str:
        """A host path to the container's `p`: through the anchor's root, its links resolved there."""
        return self.root + self.realpath(p)

    def ns_pid(self, host_pid: int) -> int | None:
        """The pid the container knows `host_pid` by; None when that process is not in it."""
        if _link(f"{PROC}/{host_pid}/ns/pid") != self.pidns:
            return None
        pids = nspid(host_pid)
        return pids[-1] if pids else None

    def pid_map(self) -> dict[int, int]:
        """Container pid -> host pid for every process in the anchor's pid namespace (one
        pass over /proc)."""
        out = {}
        for name in os.listdir(PROC):
            if name.isdigit() and _link(f"{PROC}/{name}/ns/pid") == self.pidns:
                pids = nspid(int(name))
                if pids:
                    out[pids[-1]] = int(name)
        return out

    def host_pid(self, ns_pid: int) -> int | None:
        return self.pid_map().get(ns_pid)

    def alive(self) -> bool:
        """The anchor still runs in the namespace it was found in (not gone, not a reused pid)."""
        return _link(f"{PROC}/{self.anchor}/ns/mnt") == self.mnt and \
            _link(f"{PROC}/{self.anchor}/ns/pid") == self.pidns

    def where(self) -> str:
        return f" in the namespace of pid {self.anchor}"


def of_process(pid: int, proc_root: str = PROC) -> Host | None:
    """HOST for a process in dbguard's mount namespace, its Namespace for one in a container;
    None when it is gone. A fixture tree (proc_root not /proc) has no namespaces to cross."""
    if proc_root != PROC:
        return HOST
    theirs = _link(f"{PROC}/{pid}/ns/mnt")
    if theirs is None:
        return None
    return HOST if theirs == _link(f"{PROC}/self/ns/mnt") else Namespace.of(pid)


def container_name(ns: Namespace) -> str:
    """What tells one container from another in a discovered database's name: its hostname (a
    pod's name) when it has its own, else its mount namespace."""
    try:
        with open(ns.path("/etc/hostname")) as f:
            theirs = f.read(256).strip()
        with open("/etc/hostname") as f:
            ours = f.read(256).strip()
        if theirs and theirs != ours:
            return theirs
    except (OSError, DbguardError):
        pass
    return ns.mnt.replace("mnt:[", "mnt").rstrip("]")


# --- namespace_of ---------------------------------------------------------------------------

def spec_problem(spec: str) -> str | None:
    """Why a namespace_of value cannot be used (one line), None when its form is right."""
    if spec.isdigit():
        return None if int(spec) > 1 else (f"names pid {int(spec)}: not a process in a container (pid 1 is the "
                                           "host's init); set the host pid of a process in the database's container")
    if not spec.startswith("/"):
        return ("expected a host pid, a pid file or a cgroup directory (an absolute path under "
                f"{CGROUP_ROOT}), got {spec!r}")
    if ".." in spec.split("/"):
        return f"must not contain '..', got {spec!r}"
    return None


def _cgroup_pids(d: str) -> list[int]:
    """Pids of a cgroup directory and of those below it, in the order the kernel lists them."""
    out: list[int] = []
    for dirpath, _dirs, files in os.walk(d):
        if "cgroup.procs" in files:
            try:
                out += [int(x) for x in _read(os.path.join(dirpath, "cgroup.procs")).split()]
            except (OSError, ValueError):
                continue
        if len(out) >= MAX_CGROUP_PIDS:
            break
    return out


def _candidates(spec: str) -> tuple[list[int], str]:
    """Host pids that namespace_of names, and what they are, for messages."""
    if spec.isdigit():
        return [int(spec)], f"pid {spec}"
    if spec.startswith(CGROUP_ROOT):
        if not os.path.isdir(spec):
            raise DbguardError(f"namespace_of: cgroup {spec} does not exist (is the container running?)")
        return _cgroup_pids(spec), f"cgroup {spec}"
    try:
        words = _read(spec).split()
        return [int(words[0])], f"pid file {spec}"
    except FileNotFoundError:
        raise DbguardError(f"namespace_of: pid file {spec} does not exist (is the container running?)") from None
    except (OSError, ValueError, IndexError) as e:
        raise DbguardError(f"namespace_of: cannot read a pid from {spec}: "
                           f"{getattr(e, 'strerror', None) or 'no pid in it'}") from None


def locate(spec: str, probe: str) -> Namespace:
    """The namespace `spec` names: the first of its processes whose root holds `probe` (the
    socket's directory, as the container sees it: in a pod's cgroup it tells the database's
    container from the others). Raises DbguardError in one line."""
    pids, what = _candidates(spec)
    # The namespaces of a process in another pid namespace first: the pid namespace must be the
    # server's (its pid file names pids there), and a runtime's helper in the container's cgroup
    # (`unshare` itself, a shim) may share its mount namespace but not its pid namespace.
    ours = _link(f"{PROC}/self/ns/pid")
    found = [ns for ns in map(Namespace.of, pids) if ns is not None]
    for ns in sorted(found, key=lambda ns: ns.pidns == ours):
        try:
            if os.path.exists(ns.path(probe)):
                return ns
        except (DbguardError, OSError):
            continue
    if not pids:
        raise DbguardError(f"namespace_of: {what} has no process (is the container running?)")
    if len(pids) == 1 and not found:
        raise DbguardError(f"namespace_of: {what}: process {pids[0]} does not exist (is the container running?)")
    raise DbguardError(f"namespace_of: no process of {what} sees {probe} (check the socket path: it is the "
                       "one inside the container)")


class Locator:
    """The namespace of one [[databases]] entry, found again when its anchor is gone."""

    def __init__(self, spec: str, probe: str):
        self.spec = spec
        self.probe = probe
        self._ns: Namespace | None = None

    def get(self) -> Host:
        """HOST without namespace_of; else the container's namespace. Raises DbguardError."""
        if not self.spec:
            return HOST
        if self._ns is None or not self._ns.alive():
            self._ns = None
            self._ns = locate(self.spec, self.probe)
        return self._ns

    def get_or_none(self) -> Host | None:
        try:
            return self.get()
        except DbguardError:
            return None
