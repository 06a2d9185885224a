"""Throwaway memcached servers for tests (never the system's memcached service): a unix socket
in a temp directory, running as the `memcache` OS user (the Debian package creates it), removed
by stop() / the context manager.

    with Memcached(limit_mib=128) as m:
        m.fill(100 * MiB)
        m.stats()["limit_maxbytes"]        # its own text protocol, read here: the tests' oracle
"""
from __future__ import annotations

import os
import pwd
import socket
import subprocess
import tempfile
from pathlib import Path

from dbguard.errors import DbguardError

from . import servers
from .cgroup import MemoryCgroup

SERVER = "/usr/bin/memcached"
OS_USER = "memcache"
MiB = 1024**2


def require() -> None:
    if os.geteuid() != 0:
        raise DbguardError("a throwaway memcached needs root (it runs as the memcache OS user): run as root")
    if not Path(SERVER).exists():
        raise DbguardError("memcached not installed: apt-get install memcached (or run `make setup`)")
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        raise DbguardError("no memcache OS user: apt-get install memcached creates it") from None


class Memcached:
    def __init__(self, limit_mib: int = 64, evictions: bool = True, options: tuple[str, ...] = (),
                 cgroup: MemoryCgroup | None = None):
        self.limit_mib, self.evictions, self.cgroup = limit_mib, evictions, cgroup
        self.options = options              # -o settings, e.g. ("no_slab_reassign",)
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "memcached.sock")

    def __enter__(self) -> "Memcached":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Memcached":
        self.dir = Path(tempfile.mkdtemp(prefix="dbguard-memcached-"))
        user = pwd.getpwnam(OS_USER)
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.proc = servers.spawn([SERVER, "-u", OS_USER, "-m", str(self.limit_mib), "-s", self.socket, "-a", "0700",
                                   *([] if self.evictions else ["-M"]), *(f"-o{o}" for o in self.options)],
                                  cgroup=self.cgroup)
        try:
            servers.wait_up(self.proc, self.stats, 10, "memcached")
        except RuntimeError:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.socket)
        return s

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stats(self, which: str = "") -> dict[str, int | str]:
        """`stats` (or `stats <which>`: "slabs" has total_malloced), read here: the tests' oracle."""
        with self._conn() as s:
            s.sendall(f"stats {which}".strip().encode() + b"\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("closed")
                data += chunk
        out: dict[str, int | str] = {}
        for line in data.decode().splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] == "STAT":
                out[parts[1]] = int(parts[2]) if parts[2].isdigit() else parts[2]
        return out

    def fill(self, total: int, value_size: int = 20_000, prefix: str = "k") -> int:
        n = total // value_size
        v = b"x" * value_size
        with self._conn() as s:
            for i in range(n):
                s.sendall(b"set %s%d 0 0 %d noreply\r\n%s\r\n" % (prefix.encode(), i, value_size, v))
            s.sendall(b"mn\r\n")      # meta no-op: answered once every set before it is done
            data = b""
            while b"MN\r\n" not in data:
                data += s.recv(4096)
        return n

    def stop(self) -> None:
        servers.stop(self.proc, self.dir)
