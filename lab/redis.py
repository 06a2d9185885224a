"""Throwaway Redis servers for tests and benchmarks (never the system's redis-server service).

Each gets its own temp directory (redis.conf, unix socket, log), a free port on 127.0.0.1,
no persistence, runs as the `redis` OS user (the Debian package creates it) when it exists,
optionally in a memory cgroup, and is removed completely by stop() / the context manager.

    with RedisServer(maxmemory=256 * MiB, policy="allkeys-lru") as r:
        r.fill(230 * MiB, value_size=20_000)
        r.cli("CONFIG", "GET", "maxmemory")       # redis-cli: an oracle independent of dbguard
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dbguard.caches.endpoint import Endpoint
from dbguard.caches.resp import Resp
from dbguard.errors import DbguardError

from . import servers
from .cgroup import MemoryCgroup
from .mariadb import free_port

SERVER = "/usr/bin/redis-server"
CLI = "/usr/bin/redis-cli"
OS_USER = "redis"
MiB = 1024**2


def require() -> None:
    if os.geteuid() != 0:
        raise DbguardError("a throwaway Redis needs root (it runs as the redis OS user): run as root")
    if not Path(SERVER).exists() or shutil.which(CLI) is None:
        raise DbguardError("redis-server not installed: apt-get install redis-server (or run `make setup`)")


class RedisServer:
    def __init__(self, maxmemory: int = 64 * MiB, policy: str = "allkeys-lru", cgroup: MemoryCgroup | None = None,
                 password: str | None = None, conf: list[str] | None = None):
        self.maxmemory = maxmemory
        self.policy = policy
        self.cgroup = cgroup
        self.password = password
        self.conf = conf or []           # more redis.conf lines: rename-command, user ... (ACL)
        self.dir: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "redis.sock")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "RedisServer":
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="dbguard-redis-"))
            self.port = free_port()
            lines = [f"port {self.port}", "bind 127.0.0.1", f"unixsocket {self.socket}", "unixsocketperm 700",
                     f"dir {self.dir}", f"logfile {self.dir / 'redis.log'}", 'save ""', "appendonly no",
                     "daemonize no", f"maxmemory {self.maxmemory}", f"maxmemory-policy {self.policy}",
                     "protected-mode no", *([f"requirepass {self.password}"] if self.password else []), *self.conf]
            (self.dir / "redis.conf").write_text("\n".join(lines) + "\n")
            user = self._user()
            if user is not None:
                os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.proc = servers.spawn([SERVER, str(self.dir / "redis.conf")], user, self.cgroup)
            servers.wait_up(self.proc, lambda: self.call("PING"), 20, "redis-server", (OSError, ConnectionError),
                            self.log)
            return self
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _user():
        try:
            return pwd.getpwnam(OS_USER)
        except KeyError:
            return None

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 10.0) -> Resp:
        c = Resp(Endpoint("unix", path=self.socket), timeout)
        if self.password:
            c.call("AUTH", self.password)
        return c

    def call(self, *args):
        c = self.client()
        try:
            return c.call(*args)
        finally:
            c.close()

    def cli(self, *args: str) -> str:
        """redis-cli's answer (the tests' oracle: not dbguard's own client)."""
        env = {**os.environ, **({"REDISCLI_AUTH": self.password} if self.password else {})}
        r = subprocess.run([CLI, "-s", self.socket, "--no-auth-warning", *args], capture_output=True, text=True,
                           timeout=20, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip()

    def maxmemory_now(self) -> int:
        return int(self.cli("CONFIG", "GET", "maxmemory").split()[-1])

    def info(self, section: str = "") -> dict[str, str]:
        out = {}
        for line in self.cli("INFO", *([section] if section else [])).splitlines():
            k, sep, v = line.partition(":")
            if sep:
                out[k.strip()] = v.strip()
        return out

    def fill(self, total: int, value_size: int = 20_000, prefix: str = "key") -> int:
        """SET keys of `value_size` bytes until `total` bytes were written (pipelined); the count."""
        c = self.client(60)
        n = total // value_size
        value = b"v" * value_size
        try:
            batch = 200
            for start in range(0, n, batch):
                cmds = []
                for i in range(start, min(n, start + batch)):
                    k = f"{prefix}:{i}".encode()
                    cmds.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(value), value))
                c.sock.sendall(b"".join(cmds))
                for _ in cmds:
                    c._reply()
        finally:
            c.close()
        return n

    def stop(self) -> None:
        servers.stop(self.proc, self.dir)


class CacheReader:
    """Reads random keys of what fill() wrote, as an application would, in a thread: hits,
    misses (evicted keys), wrong values and errors counted, per second too (`series`).
    `on_miss(i)`: cache-aside, e.g. read the row from the database; its value is SET back."""

    def __init__(self, server: RedisServer, keys: int, value_size: int = 20_000, prefix: str = "key",
                 pause: float = 0.005, on_miss=None, seed: int = 1):
        import random
        import threading
        self.server, self.keys, self.value_size, self.prefix = server, keys, value_size, prefix
        self.pause, self.on_miss = pause, on_miss
        self.rng = random.Random(seed)
        self.hits = self.misses = self.wrong = 0
        self.errors: list[str] = []
        self.series: list[tuple[float, int, int]] = []    # (time, hits, misses) of each second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CacheReader":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> "CacheReader":
        self._stop.set()
        self._thread.join(30)
        return self

    def _run(self) -> None:
        value = "v" * self.value_size
        c = None
        second, hits, misses = int(time.time()), 0, 0
        while not self._stop.is_set():
            try:
                if c is None:
                    c = self.server.client(5)
                i = self.rng.randrange(self.keys)
                got = c.call("GET", f"{self.prefix}:{i}")
                if got is None:
                    self.misses += 1
                    misses += 1
                    if self.on_miss is not None:
                        self.on_miss(i)
                        c.call("SET", f"{self.prefix}:{i}", value)
                elif got == value:
                    self.hits += 1
                    hits += 1
                else:
                    self.wrong += 1
            except Exception as e:      # counted: the test decides what an error means
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
                if c is not None:
                    c.close()
                c = None
                time.sleep(0.1)
            now = int(time.time())
            if now != second:
                self.series.append((float(second), hits, misses))
                second, hits, misses = now, 0, 0
            if self.pause:
                time.sleep(self.pause)
        if c is not None:
            c.close()
