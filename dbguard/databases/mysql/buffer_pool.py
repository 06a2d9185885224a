"""The InnoDB buffer pool: its step, the DBA's size, and resizing it exactly as asked.

`SET GLOBAL innodb_buffer_pool_size` (never SET PERSIST: the DBA's my.cnf stays the truth
after a restart). Two resize flavours exist: MariaDB >= 10.11.12 (it has
`innodb_buffer_pool_size_max`) resizes synchronously in the calling session in 1 MiB units
and can be aborted; MySQL and older MariaDB round to chunk_size x instances and resize in a
server background thread. Either way the SET runs on its own connection in a worker thread
(databases/bounded.py), so the caller waits at most `statement_timeout` for it.

`set_step(step)` moves to exactly the step asked. Pacing (one step at a time on the way back,
no growing while a resize runs or soon after MariaDB shrank the pool by itself) is the
policy's: this module reports those facts (Pool.resize_in_progress, Pool.self_shrunk_ago).

The DBA's size is saved in the originals file before the first change and the file is
removed only once the configured size is back, so a killed dbguard restores it at start.
The file also keeps what dbguard last set ("set"; while a resize is in flight the size before
it, "was"). Before every change the live global values are compared with it (databases/held.py):
a `SET GLOBAL` by someone else while shrunk is theirs; dbguard drops its original of that
variable (the pool: the DBA's new size is the size from then on), never sets it back, and says
so in one warning and one line of the outcome. MariaDB shrinking its own pool
(innodb_buffer_pool_size_auto_min) is no one else's change.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ...settings import DatabaseConfig
from ...errors import DbguardError
from ...model import Outcome
from ...originals import Originals
from ..bounded import BoundedCaller, Busy, Overdue
from ..held import Live, taken_over
from ..steps import halved, linear_target
from .connection import Link, limit_statements, status, variables
from .identity import server_pid, server_rss
from .stats import Pool, pool_steps, resize_running

log = logging.getLogger("dbguard")

MiB = 1024**2
POOL = "innodb_buffer_pool_size"
RESIZE_TIMEOUT = 120.0          # seconds a single buffer pool resize may take before it is aborted

# Runtime caches dbguard may scale down with `shrink_caches`, with the lowest value it uses.
CACHE_MINIMUMS: dict[str, int] = {
    "table_open_cache": 64,
    "table_definition_cache": 400,
    "thread_cache_size": 0,
    "key_buffer_size": 8 * MiB,
    "query_cache_size": 0,
}

# The per-session memory cap the server enforces on sessions that start after the SET GLOBAL:
# MariaDB's max_session_mem_used, MySQL 8.0.28+'s connection_memory_limit. While shrunk, new
# sessions may allocate at most [[databases]] session_memory_cap each: a dozen clients that
# reconnect and sort again are refused by the server itself before their sort buffers land.
# Sessions already open keep the value they started with.
SESSION_CAPS = ("max_session_mem_used", "connection_memory_limit")


@dataclasses.dataclass
class Resize:
    target: int
    started: float
    rss_before: int | None
    conn_id: int | None = None
    done: bool = False
    error: str = ""
    size_after: int | None = None
    rss_after: int | None = None
    finished: float | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "conn_id"}


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


class BufferPool:
    def __init__(self, cfg: DatabaseConfig, originals: Originals, link: Link):
        self.cfg = cfg
        self.originals = originals
        self.link = link
        self.last_resize: Resize | None = None
        self._resizer = BoundedCaller(f"dbguard-resize-{cfg.name}")
        self._baseline: int | None = None       # largest pool seen without our change: the DBA's size
        self._last_size: int | None = None      # pool size after our last look or resize
        self._self_shrunk_at: float | None = None

    # --- what the pool is ----------------------------------------------------------------------
    def saved(self) -> dict[str, Any] | None:
        return self.originals.load()      # a damaged file is moved aside there, with one warning

    def look(self, size: int, server_status: dict[str, str], live: dict[str, str]) -> Pool:
        """The pool now, from its size, the server's resize status and the global variables
        read with it (`live`: the session caps among them)."""
        size = self._observe(size)
        configured = self._configured(size)
        ago = None if self._self_shrunk_at is None else time.monotonic() - self._self_shrunk_at
        caps = {c: int(live[c]) for c in self.caps(live)}
        try:
            kept = (self.saved() or {}).get("caches", {})
        except DbguardError:
            kept = {}
        original = {c: int(kept.get(c, x)) for c, x in caps.items()}
        return Pool(size=size, configured=configured, floor=self.cfg.buffer_pool_floor, steps=self.cfg.shrink_steps,
                    resize_in_progress=self.resizing(server_status), self_shrunk_ago=ago,
                    auto_shrink_min=self._auto_shrink_min(configured),
                    # shrink_steps = 0 is the DBA's "leave this server's settings alone": no cap either
                    cap_steps=int(bool(self.cfg.shrink_steps)
                                  and any(x > self.cfg.session_memory_cap for x in original.values())),
                    cap_step=int(any(caps[c] < original[c] for c in caps)))

    def caps(self, live: dict[str, str]) -> tuple[str, ...]:
        """The session caps this server has, when dbguard is to set them."""
        return tuple(c for c in SESSION_CAPS if c in live) if self.cfg.session_memory_cap else ()

    def _target(self, name: str, original: int, step: int) -> int:
        if name in SESSION_CAPS:
            return original if step <= 0 else min(original, self.cfg.session_memory_cap)
        return halved(original, CACHE_MINIMUMS[name], step)

    def resizing(self, server_status: dict[str, str]) -> bool:
        return self._resizer.running_for() is not None or resize_running(server_status)

    def _observe(self, size: int) -> int:
        """Notice MariaDB shrinking the pool by itself (innodb_buffer_pool_size_auto_min)."""
        r = self.last_resize
        ours = r is not None and size == r.target     # our worker may not have noted it yet
        if (self._last_size is not None and size < self._last_size and not ours
                and self._auto_shrink_min(size + 1) is not None):
            self._self_shrunk_at = time.monotonic()
        self._last_size = size
        return size

    def _configured(self, size: int) -> int:
        """The DBA's size: saved originals while dbguard has it changed, else the largest seen."""
        try:
            saved = self.saved()
        except DbguardError:
            saved = None      # collect() reports it; set_step() refuses to act on it
        if saved and "innodb_buffer_pool_size" in saved:
            return int(saved["innodb_buffer_pool_size"])
        if self._baseline is None or size > self._baseline or self._auto_shrink_min(size) is None:
            # Only MariaDB's own pressure shrinking lowers the pool behind our back; without it
            # a smaller value is the DBA's new choice.
            self._baseline = size
        return self._baseline

    def _auto_shrink_min(self, configured: int) -> int | None:
        """MariaDB's own memory-pressure shrinking floor, when it is on for this pool."""
        facts = self.link.facts
        a = facts.auto_min if facts else None
        return a if a is not None and a < configured else None

    # --- one step --------------------------------------------------------------------------------
    def set_step(self, conn, step: int) -> Outcome:
        unit = self.link.facts.unit
        v = variables(conn, (POOL, *self.cfg.shrink_caches, *SESSION_CAPS))
        managed = (*self.cfg.shrink_caches, *self.caps(v))
        server_status = status(conn, "Innodb_buffer_pool_resize%")
        if self.resizing(server_status):
            r = self.last_resize
            since = f" for {time.monotonic() - r.started:.1f}s" if r else ""
            return Outcome.failed(f"mysql {self.cfg.name}: a buffer pool resize is in progress{since}; "
                                  "trying again next cycle")
        taken = self._let_go_of_theirs({n: int(x) for n, x in v.items()})
        if any(t.startswith(POOL) for t in taken):
            # The step asked for counts from the old size: the DBA's pool ends this shrink. What
            # is still dbguard's (runtime caches, no refill) goes back now; new pressure starts
            # a new shrink from the DBA's size next cycle.
            saved = self.saved()
            notes = self._set_caches(conn, saved, 0, 0, managed) if saved else []
            self.originals.clear()
            return Outcome.done("; ".join(taken + [f"buffer pool left at the {mib(int(v[POOL]))} set by someone "
                                                   "else", *notes]))
        pool = self.look(int(v[POOL]), server_status, v)
        size, configured = pool.size, pool.configured
        now_step, top, _ = pool_steps(pool, unit)
        step = max(0, min(step, top))
        target = linear_target(configured, pool.floor, pool.steps, step, unit)
        saved = self.saved()
        if (step > 0 or size < configured) and POOL not in (saved or {}):
            # Before the first change, and as soon as the pool is found smaller than the DBA's size.
            base = saved or {"caches": {c: int(v[c]) for c in managed},
                             "server": self.link.facts.version, "saved_at": time.time()}
            self.originals.save({**base, POOL: configured})
            saved = self.originals.load()
        notes = taken + self._set_caches(conn, saved, step, top, managed)
        if step >= now_step and target > size:
            # Smaller than this step already (MariaDB's own pressure shrinking): growing happens
            # only when a lower step is asked for.
            detail = f"buffer pool already {mib(size)} <= step {step} ({mib(target)}); left as is"
            return Outcome.done(self._finish(step, size, configured, detail, notes))
        if target == size:
            return Outcome.done(self._finish(step, size, configured, f"buffer pool at {mib(size)} (step {step}/{top})",
                                             notes))
        return self._resize_to(conn, target, size, step, top, configured, notes)

    def _set_caches(self, conn, saved: dict | None, step: int, top: int, managed: tuple[str, ...]) -> list[str]:
        """Runtime caches are halved at each step, never below their minimum; new sessions are
        capped from step 1 on."""
        notes = []
        originals = (saved or {}).get("caches", {})
        cur = conn.cursor()
        names = [c for c in managed if c in originals]
        for c in names:
            want = self._target(c, int(originals[c]), min(step, top))
            cur.execute(f"SET GLOBAL {c} = %s", (want,))
            notes.append(f"{c}={want}")
        if names and saved is not None:
            # As the server took them (it rounds some): what a later look compares with.
            got = {n: int(x) for n, x in variables(conn, tuple(names)).items()}
            self.originals.save({**saved, "set": {**saved.get("set", {}), **got}})
        return notes

    # --- someone else's SET GLOBAL ---------------------------------------------------------------
    def _same(self, name: str):
        if name != POOL:
            return lambda a, b: a == b
        unit, auto_min = self.link.facts.unit, self.link.facts.auto_min

        def same(live: int, ours: int) -> bool:
            # Within the server's rounding, or MariaDB's own pressure shrinking (not anyone's SET).
            return abs(live - ours) < unit or (auto_min is not None and auto_min <= live < ours)
        return same

    def _let_go_of_theirs(self, live: dict[str, int]) -> list[str]:
        """Drop the originals of variables someone else SET GLOBAL since dbguard set them; one
        line each. A file without "set" (written before it was recorded) is not judged."""
        saved = self.saved()
        if not saved or "set" not in saved:
            return []
        originals = {POOL: saved.get(POOL), **saved.get("caches", {})}
        held = {n: [x, *([saved["was"][n]] if n in saved.get("was", {}) else []), originals.get(n)]
                for n, x in saved["set"].items() if originals.get(n) is not None}
        notes, gone = [], []
        for n in held:
            if taken_over({n: held[n]}, {n: Live(live[n])} if n in live else {}, self._same(n)):
                gone.append(n)
                notes.append(f"{n} was changed by someone else while shrunk (now {live[n]}, dbguard had set "
                             f"{held[n][0]}): theirs is kept, dbguard's original {originals[n]} dropped")
                log.warning("mysql %s: %s", self.cfg.name, notes[-1])
        if not gone:
            return []
        if POOL in gone:
            self._baseline = live[POOL]          # the DBA's size from now on
        left = {k: v for k, v in saved.items() if k not in gone}
        left["caches"] = {c: x for c, x in saved.get("caches", {}).items() if c not in gone}
        for k in ("set", "was"):
            left[k] = {n: x for n, x in saved.get(k, {}).items() if n not in gone}
        if POOL not in left and not left["caches"]:
            self.originals.clear()
        else:
            self.originals.save(left)
        return notes

    def _finish(self, step: int, size: int, configured: int, detail: str, notes: list[str]) -> str:
        if step == 0 and size >= configured:
            self.originals.clear()   # the DBA's settings are back: nothing left to restore
        return detail + (f"; {', '.join(notes)}" if notes else "")

    def _resize_to(self, conn, target: int, size: int, step: int, top: int, configured: int,
                   notes: list[str]) -> Outcome:
        pid = self._server_pid(conn)
        r = Resize(target=target, started=time.monotonic(), rss_before=server_rss(pid))
        self.last_resize = r
        verb = "shrink" if target < size else "grow"
        head = f"buffer pool {verb} {mib(size)} -> {mib(target)} (step {step}/{top})"
        self._note_set(target, was=size)
        try:
            # Wait a bounded while: a MariaDB resize of a few hundred MiB takes tens of milliseconds.
            self._resizer.call(lambda: self._resize(r, pid), self.cfg.statement_timeout)
        except Overdue:
            return Outcome.done(f"{head} still running after {self.cfg.statement_timeout}s"
                                + (f"; {', '.join(notes)}" if notes else ""))
        except Busy as e:
            return Outcome.failed(f"mysql {self.cfg.name}: a buffer pool resize is in progress ({e})")
        if r.error:
            return Outcome.failed(r.error)
        return self._verify(r, head, step, configured, notes)

    def _server_pid(self, conn) -> int | None:
        """For the RSS before and after: a resize goes ahead without it."""
        try:
            v = variables(conn, ("pid_file", "datadir", "basedir"))
            return server_pid(v["pid_file"], v["datadir"], v["basedir"], self.link.facts.peer_pid,
                              self.link.ns())[0]
        except Exception:
            return None

    def _verify(self, r: Resize, head: str, step: int, configured: int, notes: list[str]) -> Outcome:
        """The variable must have moved, and on a shrink the server's memory must have fallen."""
        if r.size_after is None or abs(r.size_after - r.target) >= self.link.facts.unit:   # beyond server rounding
            return Outcome.failed(f"mysql {self.cfg.name}: {head}: server reports {mib(r.size_after or 0)}")
        self._note_set(r.size_after)
        rss = ""
        if r.rss_before is not None and r.rss_after is not None:
            rss = f"; server RSS {mib(r.rss_before)} -> {mib(r.rss_after)}"
            if r.target < r.rss_before and r.rss_after >= r.rss_before and "shrink" in head:
                rss += " (did not fall: the freed pages were not resident)"
        return Outcome.done(self._finish(step, r.size_after, configured, head + rss, notes))

    def _note_set(self, size: int, was: int | None = None) -> None:
        """Record the pool size dbguard sets (and, while the resize is in flight, the size before)."""
        saved = self.saved()
        if saved is None:
            return
        others = {n: x for n, x in saved.get("was", {}).items() if n != POOL}
        self.originals.save({**saved, "set": {**saved.get("set", {}), POOL: size},
                             "was": others | ({POOL: was} if was is not None else {})})

    def _resize(self, r: Resize, pid: int | None) -> None:
        """Runs the SET on its own connection: MariaDB resizes inside that statement."""
        conn = None
        try:
            conn = self.link.open(RESIZE_TIMEOUT + 5)
            cur = conn.cursor()
            cur.execute("SELECT CONNECTION_ID()")
            r.conn_id = cur.fetchone()[0]
            if self.link.facts.mariadb:
                limit_statements(conn, True, RESIZE_TIMEOUT)
            cur.execute("SET GLOBAL innodb_buffer_pool_size = %s", (r.target,))
            if not self.link.facts.session_resize:
                self._wait_background_resize(conn, r.started + RESIZE_TIMEOUT)
            cur.execute("SELECT @@GLOBAL.innodb_buffer_pool_size")
            r.size_after = int(cur.fetchone()[0])
            self._last_size = r.size_after
            r.rss_after = server_rss(pid)
        except Exception as e:
            r.error = self.link.explain(e, "resize the buffer pool")
        finally:
            r.finished = time.monotonic()
            r.done = True
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

    @staticmethod
    def _wait_background_resize(conn, deadline: float) -> None:
        """MySQL / older MariaDB resize in a server thread: poll its status until it is done."""
        while time.monotonic() < deadline and resize_running(status(conn, "Innodb_buffer_pool_resize%")):
            time.sleep(0.1)

    def close(self) -> None:
        self._resizer.wait(self.cfg.statement_timeout)
