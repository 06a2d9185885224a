"""Which process serves an endpoint, without logging in: the kernel's own socket tables.

A server is found from where clients reach it: the unix socket's path or the TCP port it
listens on. The kernel lists its listening sockets with their inodes (/proc/net/unix,
/proc/net/tcp, /proc/net/tcp6), and /proc/PID/fd links of the form "socket:[INODE]" say
which processes hold each one. No SQL and no password: a refused login, a LOGIN-only role
or a hung server still leave these facts, and only root can read another user's fds.

The parsers are pure (tests/unit/test_sockets.py reads recorded tables); the readers take a
`proc_root` so a fixture tree can stand in for /proc.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

TCP_LISTEN = "0A"          # include/net/tcp_states.h: TCP_LISTEN = 10
UNIX_LISTENING = 0x10000   # __SO_ACCEPTCON in the Flags column: a socket that accepts connections
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: its local address, port and inode."""

    address: str               # "127.0.0.1", "::", "0.0.0.0"
    port: int
    inode: int


# --- pure parsers ----------------------------------------------------------------------------

def _hex_address(text: str) -> str:
    """/proc/net/tcp's address column: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def parse_tcp(text: str) -> list[Listener]:
    """The listening sockets in a /proc/net/tcp or tcp6 table (other states are left out)."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or cols[3] != TCP_LISTEN:
            continue
        addr, _, port = cols[1].partition(":")
        try:
            out.append(Listener(_hex_address(addr), int(port, 16), int(cols[9])))
        except ValueError:
            continue
    return out


def parse_unix(text: str) -> dict[str, int]:
    """Path -> inode of the listening unix sockets in a /proc/net/unix table (abstract and
    unnamed sockets, and connected ones, are left out)."""
    out = {}
    for line in text.splitlines()[1:]:
        cols = line.split(None, 7)
        if len(cols) < 8 or not cols[7].startswith("/"):
            continue
        try:
            if int(cols[3], 16) & UNIX_LISTENING:
                out[cols[7].rstrip("\n")] = int(cols[6])
        except ValueError:
            continue
    return out


def parse_lock_file(text: str) -> tuple[int, str] | None:
    """(pid, data directory) from PostgreSQL's socket lock file `.s.PGSQL.<port>.lock` (or a
    postmaster.pid: the same first two lines); None when malformed."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit() or int(lines[0]) <= 0:
        return None
    return int(lines[0]), lines[1].strip()


def serves(listener: Listener, host: str, port: int) -> bool:
    """Whether a client connecting to host:port reaches this listener: same port, and its
    address is the host's or a wildcard (0.0.0.0 / ::)."""
    if listener.port != port:
        return False
    if listener.address in ("0.0.0.0", "::"):
        return True
    if host in LOOPBACK_NAMES:
        return ipaddress.ip_address(listener.address).is_loopback
    try:
        want = ipaddress.ip_address(host)
    except ValueError:
        return False               # a name we do not resolve here: only wildcards match
    have = ipaddress.ip_address(listener.address)
    mapped = getattr(have, "ipv4_mapped", None)
    return want == have or (mapped is not None and want == mapped)


# --- reading the host ------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def tcp_inodes(host: str, port: int, proc_root: str = "/proc") -> set[int]:
    """Inodes of the listening TCP sockets (v4 and v6) a client of host:port reaches."""
    found = set()
    for table in ("tcp", "tcp6"):
        for listener in parse_tcp(_read(f"{proc_root}/net/{table}")):
            if serves(listener, host, port):
                found.add(listener.inode)
    return found


def unix_inodes(path: str, proc_root: str = "/proc") -> set[int]:
    """Inodes of listening unix sockets bound at `path` (also when bound through a symlinked
    directory, such as /var/run -> /run)."""
    want = os.path.realpath(path)
    return {inode for bound, inode in parse_unix(_read(f"{proc_root}/net/unix")).items()
            if bound == path or os.path.realpath(bound) == want}


def holders(inodes: set[int], pids: list[int] | None = None, proc_root: str = "/proc") -> set[int]:
    """The processes holding a descriptor of one of these sockets. `pids`: where to look
    (every process when None). Processes whose fds are not ours to read are passed over."""
    if not inodes:
        return set()
    wanted = {f"socket:[{i}]" for i in inodes}
    if pids is None:
        pids = [int(n) for n in _listdir(proc_root) if n.isdigit()]
    out = set()
    for pid in pids:
        fd_dir = f"{proc_root}/{pid}/fd"
        for fd in _listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{fd}") in wanted:
                    out.add(pid)
                    break
            except OSError:
                continue
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def eldest(pids: set[int], proc_root: str = "/proc") -> int | None:
    """The one holder no other holder is an ancestor of (a server's children may inherit its
    listening socket); None when there is none or more than one."""
    def parent(pid: int) -> int:
        stat = _read(f"{proc_root}/{pid}/stat")
        try:
            return int(stat[stat.rindex(")") + 2:].split()[1])
        except (ValueError, IndexError):
            return 0

    roots = set()
    for pid in pids:
        p, seen = parent(pid), 0
        while p > 1 and p not in pids and seen < 64:
            p, seen = parent(p), seen + 1
        if p not in pids:
            roots.add(pid)
    return next(iter(roots)) if len(roots) == 1 else None


def listening_of(pid: int, proc_root: str = "/proc") -> tuple[list[str], list[Listener]]:
    """The unix socket paths and TCP listeners process `pid` holds."""
    held = set()
    fd_dir = f"{proc_root}/{pid}/fd"
    for fd in _listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            held.add(int(link[8:-1]))
    paths = sorted(p for p, inode in parse_unix(_read(f"{proc_root}/net/unix")).items() if inode in held)
    tcp = [t for table in ("tcp", "tcp6") for t in parse_tcp(_read(f"{proc_root}/net/{table}")) if t.inode in held]
    return paths, tcp
