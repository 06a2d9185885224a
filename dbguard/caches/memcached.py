"""memcached: `cache_memlimit` lowered in steps toward the floor, and back, over its text protocol.

A lower cache_memlimit alone only stops the cache growing: memcached frees a slab page only
when the page reaches its global page pool while it holds more than the limit, and a full
cache has no free page to move there (measured with 1.6.18: RSS stayed at 236 MiB after
256 -> 64 MiB and 5,000 evictions). So after lowering the limit dbguard moves pages there
itself, `slabs reassign -1 0` (a page of any class: its items are rescued into free chunks
or evicted), until the slab memory held (`total_malloced`) is down to the limit; each page
is then handed back to the kernel (its RSS falls: tests/integration/test_memcached.py;
figures per step: benchmarks.giveback). This needs slab_reassign (on by default since 1.5);
a server started with `-o no_slab_reassign` cannot hand memory back and is left alone, as is
one started with -M (no evictions: a lower limit would make sets fail). Both are said so and
are not shielded for a memory they cannot give.

The owner's limit is saved (keyed by the server: pid, start time, endpoint) before the first
change and removed once it is back; a restarted memcached runs at its -m again.
"""
from __future__ import annotations

import contextlib
import socket
import time
from typing import Any, Callable, Iterator

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


def why_not(settings: dict[str, str]) -> str:
    """Pure: why this server cannot give memory back ('' when it can)."""
    if settings.get("evictions") == "off":
        return "memcached runs with -M (evictions off): a lower limit would make sets fail, so it is left alone"
    if settings.get("slab_reassign") == "no":
        return ("memcached runs without slab_reassign: it cannot hand its slab pages back to the kernel, so it "
                "is left alone (drop -o no_slab_reassign to let it)")
    return ""


def held(slabs: dict[str, str]) -> int:
    """The slab memory it holds from the kernel (`stats slabs` total_malloced), in bytes."""
    return int(slabs.get("total_malloced", "0"))


def to_stats(name: str, st: dict[str, str], settings: dict[str, str], slabs: dict[str, str],
             saved: dict[str, Any] | None, floor: int, steps: int, pid: int | None) -> CacheStats:
    """Pure: the facts of one `stats`, `stats settings` and `stats slabs` answer."""
    limit = int(st.get("limit_maxbytes", "0"))
    configured = int(saved["limit_maxbytes"]) if saved else limit
    top = shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, MiB))
    step = linear_step_of(limit, configured, floor, steps, MiB) if saved else 0
    unable = why_not(settings)
    hits, misses = int(st.get("get_hits", "0")), int(st.get("get_misses", "0"))
    grow = linear_target(configured, floor, steps, step - 1, MiB) - limit if step > 0 else 0
    return CacheStats(name=name, kind="memcached", up=True, server_pid=pid, memory=held(slabs),
                      limit=limit, configured=configured, shrink_step=step,
                      shrink_steps_max=0 if unable and step == 0 else top, grow_bytes=max(0, grow),
                      why_not=unable, evictions=int(st.get("evictions", "0")),
                      hit_ratio=hits / (hits + misses) if hits + misses else None,
                      extra={"item_bytes": int(st.get("bytes", "0"))})


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

    @contextlib.contextmanager
    def _session(self) -> Iterator[Callable[..., list[str]]]:
        """One short connection: a few commands each cycle, no state to go stale. Yields ask(command,
        one_line=False): the lines of its answer up to END/OK, or its one line (slabs reassign)."""
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

            def ask(command: str, one_line: bool = False) -> list[str]:
                sock.sendall(command.encode() + b"\r\n")
                lines = []
                while True:
                    raw = f.readline(65536)
                    if not raw:
                        raise ConnectionError("connection closed by the server")
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    if line == "ERROR" or line.startswith(("CLIENT_ERROR", "SERVER_ERROR")):
                        raise ProtocolError(f"{command.split()[0]}: {line}"[:300])
                    if line in ("END", "OK") and not one_line:
                        return lines
                    lines.append(line)
                    if one_line:
                        return lines
            yield ask
        finally:
            sock.close()

    def _ask(self, *commands: str) -> list[list[str]]:
        with self._session() as ask:
            return [ask(c) for c in commands]

    def _hand_back(self, target: int) -> tuple[int, int, str]:
        """Slab pages moved to the global page pool, where memcached frees each one while it holds
        more than its limit, until it holds no more than `target` or the entry's timeout has
        passed: (pages moved, bytes held now, why it stopped early or '')."""
        deadline = time.monotonic() + self.cfg.timeout
        moved = 0
        with self._session() as ask:
            while (now := held(stats_of(ask("stats slabs")))) > target:
                if time.monotonic() > deadline:
                    return moved, now, f"still above the limit after {self.cfg.timeout:g} s (the next step goes on)"
                answer = ask("slabs reassign -1 0", one_line=True)[0]
                if answer == "OK":
                    moved += 1
                elif answer.startswith("BUSY"):       # one page moves at a time
                    time.sleep(0.002)
                else:                                 # NOSPARE: no class has a page to spare
                    return moved, now, f"slabs reassign: {answer}"[:200]
        return moved, now, ""

    def _read(self) -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, Any] | None, int | None]:
        st, settings, slabs = (stats_of(lines) for lines in self._ask("stats", "stats settings", "stats slabs"))
        hint = int(st["pid"]) if st.get("pid", "").isdigit() else None
        if hint is None or hint != self._pid:
            self._pid = listener_pid(self.ep, hint)
        started = str(int(st.get("time", "0")) - int(st.get("uptime", "0")))
        self._identity = {"pid": st.get("pid", ""), "started": started, "endpoint": str(self.ep)}
        return st, settings, slabs, self.originals.load(), self._pid

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
            st, settings, slabs, saved, pid = self._read()
        except Exception as e:        # never into the loop
            self._down = CacheStats(name=self.name, kind=self.kind, up=False, error=self._explain(e))
            self._retry_at = time.monotonic() + RETRY_DOWN
            return self._down
        self._down = None
        return to_stats(self.name, st, settings, slabs, saved, self.cfg.floor, self.cfg.shrink_steps, pid)

    def set_shrink_step(self, step: int) -> Outcome:
        try:
            st, settings, slabs, saved, pid = self._read()
            s = to_stats(self.name, st, settings, slabs, saved, self.cfg.floor, self.cfg.shrink_steps, pid)
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
            moved, now_held, stopped = self._hand_back(target) if s.memory > target else (0, s.memory, "")
            after = stats_of(self._ask("stats")[0])
        except Exception as e:
            return Outcome.failed(self._explain(e))
        now = int(after.get("limit_maxbytes", "0"))
        verb = "lowered" if now < s.limit else "raised" if now > s.limit else "at"
        gave = (f"; {moved} slab page(s) handed back, {s.memory // MiB} -> {now_held // MiB} MiB held" if moved
                else "")
        return Outcome.done(f"cache_memlimit {verb} {s.limit // MiB} -> {now // MiB} MiB (step {step}/"
                            f"{s.shrink_steps_max}){gave}{'; ' + stopped if stopped else ''}; "
                            f"{int(after.get('bytes', '0')) // MiB} MiB in items, "
                            f"{int(after.get('evictions', '0')) - s.evictions} eviction(s) since")
