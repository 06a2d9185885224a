"""Where a cache or pooler listens, from its url, and which process owns that socket.

The url is parsed here, purely (config checks use it); the owner is found by fact: the
listening socket's inode in /proc/net/{tcp,tcp6,unix} and the process holding a descriptor
for that inode (databases/sockets.py), never by a process's name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..databases import sockets


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

def listener_pid(ep: Endpoint, hint: int | None = None, root: str = "/proc") -> int | None:
    """The pid of the process holding the socket that listens at `ep` (`hint`, the pid the server
    says it has, is tried first); None when none is found (not listening, or not ours to read).
    The kernel's socket tables are read by databases/sockets.py, as for a database."""
    inodes = sockets.unix_inodes(ep.path, root) if ep.kind == "unix" else sockets.tcp_inodes(ep.host, ep.port, root)
    if not inodes:
        return None
    if hint is not None and sockets.holders(inodes, [hint], root):
        return hint
    return sockets.eldest(sockets.holders(inodes, None, root), root)
