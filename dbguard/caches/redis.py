"""Redis and Valkey: `maxmemory` lowered in steps toward the floor with CONFIG SET, and back.

Only where Redis can make room by itself: with an eviction policy (allkeys-*, or volatile-*
while keys have an expiry) it evicts down to the new maxmemory at once; with noeviction a
lower maxmemory would make writes fail, so the cache is left alone and said so. Facts come
from INFO alone (it holds maxmemory and the policy), so a server whose CONFIG is renamed or
denied by ACL is still read; the refusal is reported by name the first time a change fails.

The owner's maxmemory is saved (keyed by the server's identity: run_id, pid and endpoint)
before the first change and removed once it is back. A server restarted meanwhile (another
run_id) runs at its redis.conf value again: the saved file is another server's, moved aside.
"""
from __future__ import annotations

import time
from typing import Any

from ..databases.steps import linear_step_of, linear_steps_to_floor, linear_target, shrink_steps_max
from ..errors import ConfigError
from ..model import CacheStats, Outcome
from ..originals import Originals
from ..sense.procfs import read_proc
from .base import AppCache
from .endpoint import listener_pid, redis_url
from .resp import Resp, RespError

MiB = 1024**2
# A cache that did not answer is not asked again for this long: a hung server would otherwise
# cost the loop its timeout every cycle.
RETRY_DOWN = 5.0
_SCHEMA = {"maxmemory": int, "saved_at?": float}


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


# --- pure: INFO in, facts out ---------------------------------------------------------------------

def parse_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def expiring_keys(info: dict[str, str]) -> int:
    """Keys with an expiry, over every database (INFO keyspace: db0:keys=10,expires=3,...)."""
    total = 0
    for key, value in info.items():
        if key.startswith("db") and key[2:].isdigit():
            fields = dict(f.partition("=")[::2] for f in value.split(","))
            total += int(fields.get("expires", "0") or 0)
    return total


def cannot_evict(info: dict[str, str], configured: int) -> str:
    """Why lowering maxmemory would not make Redis give memory back ('' when it would)."""
    policy = info.get("maxmemory_policy", "")
    if configured == 0:
        return "maxmemory is 0 (no limit): there is no limit to lower; set maxmemory in its config to let dbguard shrink it"
    if policy == "noeviction":
        return ("maxmemory-policy is noeviction: a lower maxmemory would make writes fail, so it is left alone "
                "(an allkeys-* or volatile-* policy lets dbguard shrink it)")
    if policy.startswith("volatile-") and expiring_keys(info) == 0:
        return f"maxmemory-policy is {policy} and no key has an expiry: nothing Redis may evict, so it is left alone"
    return ""


def to_stats(name: str, info: dict[str, str], saved: dict[str, Any] | None, floor: int, steps: int,
             pid: int | None, refused: str) -> CacheStats:
    maxmemory = int(info.get("maxmemory", "0"))
    configured = int(saved["maxmemory"]) if saved else maxmemory
    top = shrink_steps_max(steps, linear_steps_to_floor(configured, floor, steps, MiB))
    step = linear_step_of(maxmemory, configured, floor, steps, MiB) if saved else 0
    grow = linear_target(configured, floor, steps, step - 1, MiB) - maxmemory if step > 0 else 0
    hits, misses = int(info.get("keyspace_hits", "0")), int(info.get("keyspace_misses", "0"))
    why_not = refused or cannot_evict(info, configured)
    return CacheStats(name=name, kind="redis", up=True, server_pid=pid, memory=int(info.get("used_memory", "0")),
                      limit=maxmemory, configured=configured, shrink_step=step,
                      shrink_steps_max=0 if why_not and step == 0 else top, grow_bytes=max(0, grow),
                      why_not=why_not, evictions=int(info.get("evicted_keys", "0")),
                      hit_ratio=hits / (hits + misses) if hits + misses else None,
                      extra={"policy": info.get("maxmemory_policy", ""), "run_id": info.get("run_id", ""),
                             "rss_bytes": int(info.get("used_memory_rss", "0"))})


def _rss(pid: int | None) -> int:
    proc = read_proc(pid) if pid else None
    return proc.rss_bytes if proc else 0


def refusal(name: str, e: RespError) -> str:
    """CONFIG SET refused: the server's own words and the fix, in one line."""
    msg = str(e)
    if msg.startswith("NOPERM"):
        fix = "allow it for dbguard's user: ACL SETUSER <user> +config|set +config|get +info +memory|purge"
    elif "unknown command" in msg:
        fix = "CONFIG is renamed or disabled (rename-command in redis.conf); dbguard needs CONFIG SET"
    else:
        fix = "dbguard needs CONFIG SET maxmemory"
    return f"redis {name}: CONFIG SET refused ({msg}); {fix}"


# --- the adapter ----------------------------------------------------------------------------------

class Redis(AppCache):
    kind = "redis"

    def __init__(self, cfg, state_dir: str):
        self.cfg = cfg
        self.name = cfg.name
        self.ep = redis_url(cfg.url)
        self._identity: dict[str, str] | None = None     # the live server: run_id, pid, endpoint
        self.originals = Originals(state_dir, f"cache-{cfg.name}", _SCHEMA, fix=(
            f"check maxmemory of redis {cfg.name} (CONFIG GET maxmemory) is the configured size"),
            server=lambda: self._identity)
        self.conn: Resp | None = None
        self.refused = ""            # a CONFIG SET refusal, said until the server restarts
        self.refused_run = ""
        self._pid: int | None = None
        self._down: CacheStats | None = None
        self._retry_at = 0.0

    def _client(self) -> Resp:
        if self.conn is None:
            conn = Resp(self.ep, self.cfg.timeout)
            try:
                password = self.cfg.password()
                if password is not None:
                    conn.call("AUTH", *([self.ep.user] if self.ep.user else []), password)
            except BaseException:
                conn.close()
                raise
            self.conn = conn
        return self.conn

    def _run(self, fn):
        """fn(connection); a connection the server dropped (a restart) is replaced once."""
        reused = self.conn is not None
        try:
            return fn(self._client())
        except (OSError, ConnectionError):
            self._drop()
            if not reused:
                raise
            return fn(self._client())

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _explain(self, e: Exception) -> str:
        if isinstance(e, ConfigError):
            return str(e)
        if isinstance(e, RespError):
            if str(e).startswith(("WRONGPASS", "NOAUTH", "ERR invalid password", "ERR AUTH")):
                return (f"redis {self.name}: login refused ({e}); check password_file/password_env "
                        f"(and the user in url) in [[caches]] {self.name}")
            return f"redis {self.name}: {e}"
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return f"redis {self.name}: cannot reach the server at {self.ep}: {why}; is it running? check url in [[caches]] {self.name}"

    def _info(self, conn: Resp) -> dict[str, str]:
        return parse_info(conn.call("INFO"))

    def _saved(self, info: dict[str, str]) -> dict[str, Any] | None:
        """The saved maxmemory; a file of another server (a restart: another run_id, and it runs
        at its redis.conf value again) is moved aside by Originals, never applied."""
        run_id = info.get("run_id", "")
        self._identity = {"run_id": run_id, "pid": info.get("process_id", ""), "endpoint": str(self.ep)} \
            if run_id else None
        return self.originals.load()

    def _facts(self, conn: Resp) -> tuple[dict[str, str], dict[str, Any] | None, int | None]:
        info = self._info(conn)
        if self.refused and info.get("run_id") != self.refused_run:
            self.refused = ""        # another server now: ask again
        hint = int(info["process_id"]) if info.get("process_id", "").isdigit() else None
        if hint is None or hint != self._pid:
            self._pid = listener_pid(self.ep, hint)
        return info, self._saved(info), self._pid

    def collect(self) -> CacheStats:
        if self._down is not None and time.monotonic() < self._retry_at:
            return self._down       # a server that did not answer is asked again after RETRY_DOWN
        try:
            info, saved, pid = self._run(self._facts)
        except Exception as e:       # never into the loop: stale, protection goes on
            self._drop()
            self._down = CacheStats(name=self.name, kind=self.kind, up=False, error=self._explain(e))
            self._retry_at = time.monotonic() + RETRY_DOWN
            return self._down
        self._down = None
        return to_stats(self.name, info, saved, self.cfg.floor, self.cfg.shrink_steps, pid, self.refused)

    def set_shrink_step(self, step: int) -> Outcome:
        try:
            return self._run(lambda conn: self._set_step(conn, step))
        except RespError as e:
            return Outcome.failed(self._explain(e))
        except Exception as e:
            self._drop()
            return Outcome.failed(self._explain(e))

    def _set_step(self, conn: Resp, step: int) -> Outcome:
        info, saved, pid = self._facts(conn)
        s = to_stats(self.name, info, saved, self.cfg.floor, self.cfg.shrink_steps, pid, self.refused)
        if step > s.shrink_step and s.why_not:
            return Outcome.refused(f"redis {self.name}: {s.why_not}")
        step = max(0, min(step, s.shrink_steps_max))
        target = linear_target(s.configured, self.cfg.floor, self.cfg.shrink_steps, step, MiB)
        if target == s.limit:
            if step == 0:
                self.originals.clear()
            return Outcome.done(f"maxmemory {mib(target)} (step {step}/{s.shrink_steps_max})")
        if saved is None:       # the owner's value on disk before the first change
            self.originals.save({"maxmemory": s.configured, "saved_at": time.time()})
        try:
            conn.call("CONFIG", "SET", "maxmemory", str(target))
        except RespError as e:
            if saved is None:
                self.originals.clear()      # nothing was changed
            self.refused, self.refused_run = refusal(self.name, e), info.get("run_id", "")
            return Outcome.failed(self.refused)
        if step == 0:
            self.originals.clear()
        rss_before = _rss(pid)
        after = self._settle(conn, target) if target < s.limit else self._info(conn)
        verb = "lowered" if target < s.limit else "raised"
        rss_after = _rss(pid)
        rss = f", rss {mib(rss_before)} -> {mib(rss_after)}" if rss_before and rss_after else ""
        return Outcome.done(
            f"maxmemory {verb} {mib(s.limit)} -> {mib(target)} (step {step}/{s.shrink_steps_max}); used "
            f"{mib(s.memory)} -> {mib(int(after.get('used_memory', '0')))}{rss}, "
            f"{int(after.get('evicted_keys', '0')) - s.evictions} key(s) evicted")

    def _settle(self, conn: Resp, target: int) -> dict[str, str]:
        """Redis evicts down to the new maxmemory in time-boxed rounds: wait (bounded) until it
        is there, then have jemalloc hand the freed pages back at once (MEMORY PURGE); without
        the purge the process keeps them for a while and the cgroup sees no relief."""
        deadline = time.monotonic() + min(1.0, self.cfg.timeout)
        info = self._info(conn)
        while int(info.get("used_memory", "0")) > target and time.monotonic() < deadline:
            time.sleep(0.02)
            info = self._info(conn)
        try:
            conn.call("MEMORY", "PURGE")
        except RespError:
            pass            # not jemalloc, or denied by ACL: the pages go back later, on jemalloc's own time
        return info

    def close(self) -> None:
        self._drop()
