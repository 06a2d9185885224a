"""memcached: `cache_memlimit` lowered in steps toward the floor, and back, over its text protocol.

Measured with memcached 1.6.18 (Debian 12): a lower cache_memlimit takes effect at once (new
sets evict instead of allocating: the cache stops growing), but the slab memory it already
holds is not handed back to the kernel (RSS stayed at 236 MiB after 256 -> 64 MiB and 5,000
evictions). So for memcached the answer caps the cache where it is; a server started with
-M (no evictions) is left alone and said so, since a lower limit would make sets fail.

The owner's limit is saved (keyed by the server: pid, start time, endpoint) before the first
change and removed once it is back; a restarted memcached runs at its -m again.
"""
from __future__ import annotations

import socket
import time
from typing import Any

from ..databases.steps import linear_step_of, linear_steps_to_floor, linear_target, shrink_steps_max
from ..model import CacheStats, Outcome
from ..originals import Originals
from .base import AppCache
from .endpoint import host_port, listener_pid

MiB = 1024**2
RETRY_DOWN = 5.0          # as for Redis: a server that did not answer is asked again after this
_SCHEMA = {"limit_maxbytes": int, "saved_at?": float}


class ProtocolError(Exception):
    """memcached answered ERROR / CLIENT_ERROR / SERVER_ERROR: its one line."""


def stats_of(lines: list[str]) -> dict[str, str]:
    return {p[1]: p[2] for p in (line.split(" ", 2) for line in lines) if len(p) == 3 and p[0] == "STAT"}


def to_stats(name: str, st: dict[str, str], settings: dict[str, str], saved: dict[str, Any] | None, floor: int,
             steps: int, pid: int | None) -> CacheStats:
    """Pure: the facts of one `stats` and `stats settings` answer."""
    limit = int(st.get("limit_maxbytes", "0"))
    configured = int(saved["limit_maxbytes"]) if saved else limit
    top = shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, MiB))
    step = linear_step_of(limit, configured, floor, steps, MiB) if saved else 0
    why_not = ("memcached runs with -M (evictions off): a lower limit would make sets fail, so it is left alone"
               if settings.get("evictions") == "off" else "")
    hits, misses = int(st.get("get_hits", "0")), int(st.get("get_misses", "0"))
    grow = linear_target(configured, floor, steps, step - 1, MiB) - limit if step > 0 else 0
    return CacheStats(name=name, kind="memcached", up=True, server_pid=pid, memory=int(st.get("bytes", "0")),
                      limit=limit, configured=configured, shrink_step=step,
                      shrink_steps_max=0 if why_not and step == 0 else top, grow_bytes=max(0, grow),
                      why_not=why_not, evictions=int(st.get("evictions", "0")),
                      hit_ratio=hits / (hits + misses) if hits + misses else None)


class Memcached(AppCache):
    kind = "memcached"

    def __init__(self, cfg, state_dir: str):
        self.cfg = cfg
        self.name = cfg.name
        self.ep = host_port(cfg.url)
        self._identity: dict[str, str] | None = None
        self.originals = Originals(state_dir, f"cache-{cfg.name}", _SCHEMA, fix=(
            f"check cache_memlimit of memcached {cfg.name} (stats: limit_maxbytes) is the configured size"),
            server=lambda: self._identity)
        self._pid: int | None = None
        self._down: CacheStats | None = None
        self._retry_at = 0.0

    def _ask(self, *commands: str) -> list[list[str]]:
        """One short connection per round: a few commands each cycle, no state to go stale."""
        if self.ep.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: Any = self.ep.path
        else:
            info = socket.getaddrinfo(self.ep.host, self.ep.port, type=socket.SOCK_STREAM)[0]
            sock, where = socket.socket(info[0], socket.SOCK_STREAM), info[4]
        sock.settimeout(self.cfg.timeout)
        try:
            sock.connect(where)
            f = sock.makefile("rb")
            out = []
            for c in commands:
                sock.sendall(c.encode() + b"\r\n")
                lines = []
                while True:
                    raw = f.readline(65536)
                    if not raw:
                        raise ConnectionError("connection closed by the server")
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    if line in ("ERROR",) or line.startswith(("CLIENT_ERROR", "SERVER_ERROR")):
                        raise ProtocolError(f"{c.split()[0]}: {line}"[:300])
                    if line in ("END", "OK"):
                        break
                    lines.append(line)
                out.append(lines)
            return out
        finally:
            sock.close()

    def _read(self) -> tuple[dict[str, str], dict[str, str], dict[str, Any] | None, int | None]:
        raw, raw_settings = self._ask("stats", "stats settings")
        st, settings = stats_of(raw), stats_of(raw_settings)
        hint = int(st["pid"]) if st.get("pid", "").isdigit() else None
        if hint is None or hint != self._pid:
            self._pid = listener_pid(self.ep, hint)
        started = str(int(st.get("time", "0")) - int(st.get("uptime", "0")))
        self._identity = {"pid": st.get("pid", ""), "started": started, "endpoint": str(self.ep)}
        return st, settings, self.originals.load(), self._pid

    def _explain(self, e: Exception) -> str:
        if isinstance(e, ProtocolError):
            return f"memcached {self.name}: {e}"
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return (f"memcached {self.name}: cannot reach the server at {self.ep}: {why}; is it running? check url in "
                f"[[caches]] {self.name}")

    def collect(self) -> CacheStats:
        if self._down is not None and time.monotonic() < self._retry_at:
            return self._down
        try:
            st, settings, saved, pid = self._read()
        except Exception as e:        # never into the loop
            self._down = CacheStats(name=self.name, kind=self.kind, up=False, error=self._explain(e))
            self._retry_at = time.monotonic() + RETRY_DOWN
            return self._down
        self._down = None
        return to_stats(self.name, st, settings, saved, self.cfg.floor, self.cfg.shrink_steps, pid)

    def set_shrink_step(self, step: int) -> Outcome:
        try:
            st, settings, saved, pid = self._read()
            s = to_stats(self.name, st, settings, saved, self.cfg.floor, self.cfg.shrink_steps, pid)
            if step > s.shrink_step and s.why_not:
                return Outcome.refused(f"memcached {self.name}: {s.why_not}")
            step = max(0, min(step, s.shrink_steps_max))
            target = linear_target(s.configured, self.cfg.floor, self.cfg.shrink_steps, step, MiB)
            if target != s.limit:
                if saved is None:
                    self.originals.save({"limit_maxbytes": s.configured, "saved_at": time.time()})
                self._ask(f"cache_memlimit {max(1, target // MiB)}")
            if step == 0:
                self.originals.clear()
            after = stats_of(self._ask("stats")[0])
        except Exception as e:
            return Outcome.failed(self._explain(e))
        now = int(after.get("limit_maxbytes", "0"))
        verb = "lowered" if now < s.limit else "raised" if now > s.limit else "at"
        return Outcome.done(f"cache_memlimit {verb} {s.limit // MiB} -> {now // MiB} MiB (step {step}/"
                            f"{s.shrink_steps_max}); {int(after.get('bytes', '0')) // MiB} MiB in items, "
                            f"{int(after.get('evictions', '0')) - s.evictions} eviction(s) since")
