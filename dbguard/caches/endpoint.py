"""Where a cache or pooler listens, from its url, and which process owns that socket.

The url is parsed here, purely (config checks use it); the owner is found by fact: the
listening socket's inode in /proc/net/{tcp,tcp6,unix} and the process holding a descriptor
for that inode, never by a process's name.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

LISTEN = "0A"           # TCP_LISTEN in /proc/net/tcp
UNIX_LISTENING = 1 << 16  # __SO_ACCEPTCON in /proc/net/unix flags


@dataclass(frozen=True)
class Endpoint:
    kind: str             # "unix" or "tcp"
    path: str = ""        # the socket file
    host: str = ""
    port: int = 0
    user: str = ""        # Redis ACL user named in the url (the password never is)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.host}:{self.port}"

    @property
    def key(self) -> tuple:
        """The same server whatever way it is written (for duplicate checks)."""
        return ("unix", os.path.normpath(self.path)) if self.kind == "unix" else ("tcp", self.host.lower(), self.port)


class BadUrl(ValueError):
    """One line saying what is wrong with a url; never quotes a password."""


def _port(text: str | None, default: int) -> int:
    if text in (None, ""):
        return default
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadUrl(f"port {text[:20]!r} is not a port number (1-65535)")
    return int(text)


def _unix(path: str) -> Endpoint:
    if not path.startswith("/"):
        raise BadUrl(f"a socket path must be absolute, got {path[:80]!r}")
    if ".." in path.split("/"):
        raise BadUrl("a socket path must not contain '..'")
    return Endpoint("unix", path=path)


def redis_url(url: str, default_port: int = 6379) -> Endpoint:
    """redis://[user@]host[:port][/db] or unix:///path/redis.sock (also a bare /path)."""
    if url.startswith("/"):
        return _unix(url)
    try:
        u = urlsplit(url)
        password, port = u.password, u.port
    except ValueError:
        raise BadUrl("not a url such as redis://127.0.0.1:6379 or unix:///run/redis/redis.sock, "
                     "or its port is not a number from 1 to 65535") from None
    if password is not None or "password" in u.query.lower():
        raise BadUrl("holds a password; use password_file or password_env instead, and change the password "
                     "if this file was shared")
    if u.scheme == "rediss":
        raise BadUrl("TLS (rediss://) is not supported; use a unix socket or a loopback address")
    if u.query or u.fragment:
        raise BadUrl("takes no ?options or #fragment")
    if u.scheme == "unix":
        return _unix(unquote(u.path))
    if u.scheme != "redis" or not u.hostname:
        raise BadUrl("expected redis://HOST[:PORT] or unix:///PATH")
    if port == 0:
        raise BadUrl("port 0 is not a port number (1-65535)")
    return Endpoint("tcp", host=u.hostname, port=port or default_port, user=unquote(u.username or ""))


def host_port(text: str, default_port: int = 11211) -> Endpoint:
    """HOST:PORT, [IPv6]:PORT, a socket path, or unix:///PATH (memcached's ways of naming a server)."""
    if text.startswith("unix://"):
        return _unix(text[len("unix://"):])
    if text.startswith("/"):
        return _unix(text)
    if "@" in text or "://" in text:
        raise BadUrl("expected HOST:PORT or a socket path, e.g. 127.0.0.1:11211 or /run/memcached/memcached.sock")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return Endpoint("tcp", host=host, port=_port(rest.removeprefix(":") or None, default_port))
    host, _, port = text.partition(":")
    if not host:
        raise BadUrl("expected HOST:PORT or a socket path")
    return Endpoint("tcp", host=host, port=_port(port or None, default_port))


# --- the owner of a listening socket --------------------------------------------------------------

def _tcp_inodes(port: int, host: str, root: str) -> set[int]:
    """Inodes of sockets listening on `port` at `host` (or at a wildcard address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = {ipaddress.ip_address(i[4][0]) for i in infos}
    except (OSError, ValueError):
        addrs = set()
    inodes = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{root}/net/{name}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10 or cols[3] != LISTEN:
                        continue
                    local_hex, port_hex = cols[1].split(":")
                    if int(port_hex, 16) != port:
                        continue
                    local = _hex_addr(local_hex)
                    if local is None or local.is_unspecified or local in addrs or _mapped(local) in addrs:
                        inodes.add(int(cols[9]))
        except OSError:
            continue
    return inodes


def _hex_addr(h: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order)."""
    try:
        raw = bytes.fromhex(h)
    except ValueError:
        return None
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words) if len(words) in (4, 16) else None


def _mapped(a):
    return getattr(a, "ipv4_mapped", None)


def _unix_inodes(path: str, root: str) -> set[int]:
    inodes = set()
    want = os.path.normpath(path)
    try:
        with open(f"{root}/net/unix") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) >= 8 and int(cols[3], 16) & UNIX_LISTENING and os.path.normpath(cols[7]) == want:
                    inodes.add(int(cols[6]))
    except OSError:
        pass
    return inodes


def _holds(pid: int, targets: set[str], root: str) -> bool:
    try:
        for fd in os.scandir(f"{root}/{pid}/fd"):
            try:
                if os.readlink(fd.path) in targets:
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def listener_pid(ep: Endpoint, hint: int | None = None, root: str = "/proc") -> int | None:
    """The pid of the process holding the socket that listens at `ep` (`hint`, the pid the server
    says it has, is tried first); None when none is found (not listening, or not ours to read)."""
    inodes = _unix_inodes(ep.path, root) if ep.kind == "unix" else _tcp_inodes(ep.port, ep.host, root)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    if hint is not None and _holds(hint, targets, root):
        return hint
    for entry in os.scandir(root):
        if entry.name.isdigit() and _holds(int(entry.name), targets, root):
            return int(entry.name)
    return None
