"""The process table kept from one cycle to the next, so a cycle costs what changed, not what exists.

Reading /proc costs tens of microseconds per file per process; a host with 10,000 processes
read in full each cycle spends a second on it. Most of what a process is cannot change for
its (pid, start time): so a process is read in full when it appears, looked at once more
while young (a fork reads as its parent until it execs), and after that only when its answer
can matter:

- under pressure (`fresh`), every process in the watched scope each cycle (up to a budget,
  the rest in rotation): the policy chooses from these, and a decision rests on facts of this
  cycle. A known process is read only for what changes while it runs one program (memory,
  score, owner: procfs.reread); its cgroup is checked against the scope's cgroup.procs, and
  a move, an exec or a rename gets a full read;
- always, the largest few each cycle for what changes (procfs.reread: their memory, so RSS-based
  rules and `explain` stay roughly right at rest), and every process in a slow sweep, in full:
  a cost that does not grow with the count.

Births, execs and exits come from the kernel's process connector (sense/procevents.py)
where it is ours to read: then /proc is not even listed at rest, and a reused pid is a death
and a birth like any other. Without it (or when it dropped events) /proc is listed, and a
pid reused between two listings keeps its old facts until it is read again; nothing acts
on a stale entry: every act re-checks the process's start time through a pidfd
(act/process.py), and under pressure the scope is read afresh.
"""
from __future__ import annotations

import heapq
import os
import time

from ..model import Proc
from .procevents import Changes, ProcEvents
from .procfs import read_proc, reread
from .scope import relative_memcg

TOP_EACH_CYCLE = 16         # the largest processes, read every cycle even at rest
KEPT_READINGS = 4           # x top: the largest readings the heap keeps (not one per process)
SWEEP_SECONDS = 300.0       # at rest, every other process is read again within this time
YOUNG_SECONDS = 2.0         # read once more if first seen this soon after its start (exec)
FRESH_BUDGET = 1500         # most processes read in one cycle under pressure (the rest rotate)
LIST_EVERY = 60.0           # with process events, /proc is still listed this often (belt and braces)

PID_BITS = 22               # pids are below 2**22 (the kernel's PID_MAX_LIMIT)
PID_MASK = (1 << PID_BITS) - 1


def clk_tck() -> int:
    return os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def scope_members(cgroup_dir: str) -> dict[int, str | None] | None:
    """Pids in a cgroup and every cgroup below it, each with the memory cgroup it is listed in
    (/proc/PID/cgroup form; None where that cannot be said); None when the cgroups cannot be
    read: then every process is a member as far as the caller knows."""
    pids: dict[int, str | None] = {}
    try:
        for d, _, files in os.walk(cgroup_dir):
            if "cgroup.procs" in files:
                with open(os.path.join(d, "cgroup.procs"), "rb") as f:
                    pids.update(dict.fromkeys(map(int, f.read().split()), relative_memcg(d)))
    except (OSError, ValueError):
        return None
    return pids


class ProcTable:
    """{pid: Proc}, refreshed incrementally (see the module's docstring)."""

    def __init__(self, root: str = "/proc", sweep_seconds: float = SWEEP_SECONDS,
                 top: int = TOP_EACH_CYCLE, budget: int = FRESH_BUDGET, events: ProcEvents | None = None):
        self.root = root
        self.events = events
        self._listed_at = float("-inf")
        self.sweep_seconds = sweep_seconds
        self.top = top
        self.budget = budget
        self.procs: dict[int, Proc] = {}
        self.born: list[int] = []           # pids that appeared in the last refresh
        self.reads = 0                      # processes read (in full or not) in the last refresh (for metrics)
        self.changed: set[int] = set()      # pids read, born or gone since take_changed()
        self._young: set[int] = set()
        self._retry: set[int] = set()
        self._sweep: list[int] = []         # at rest: the rest of this sweep, next last
        self._sweep_due = 0.0               # the sweep's share carried over (under one process)
        self._round: list[int] = []         # under pressure: the rest of this round, next first
        # The largest readings as one int each, -(RSS in KiB << PID_BITS | pid), largest first;
        # an entry whose RSS is no longer the table's is stale and dropped when met: the largest
        # at rest without a pass over all. Only the KEPT_READINGS x top largest are kept: what
        # it costs does not grow with the processes on the host, and one dropped is smaller than
        # all of those, read again by the sweep (or each cycle under pressure) and pushed then.
        self._by_rss: list[int] = []
        self._last = time.monotonic()
        self._hz = clk_tck()
        self._boot = boot_time()

    def _read(self, pid: int) -> None:
        p = read_proc(pid, self.root)
        self.reads += 1
        self.changed.add(pid)
        if p is not None:
            self._put(pid, p)
            return
        self.procs.pop(pid, None)
        if os.path.exists(f"{self.root}/{pid}"):
            # Caught half-way (a main thread exiting, an exec): there, but not readable this
            # instant. Look again next time rather than lose it until the next listing.
            self._retry.add(pid)

    def _reread(self, pid: int) -> None:
        """What can change of a known process (procfs.reread); in full when that is not enough."""
        old = self.procs[pid]
        p = reread(old, self.root)
        if p is None:
            self._read(pid)
            return
        self.reads += 1
        if p is not old:
            self.changed.add(pid)
            self._put(pid, p)

    def _put(self, pid: int, p: Proc) -> None:
        self.procs[pid] = p
        if not p.kernel_thread:
            heapq.heappush(self._by_rss, -(p.rss_bytes >> 10 << PID_BITS | pid))

    def _is_young(self, p: Proc, now: float) -> bool:
        return not p.kernel_thread and now - (self._boot + p.start_time / self._hz) < YOUNG_SECONDS

    def refresh(self, fresh: bool, members: dict[int, str | None] | None = None,
                memcg: str | None = None) -> dict[int, Proc]:
        """The table now. `fresh`: read the memory of every process of the scope afresh: those
        `members` lists (scope_members: pid -> the memory cgroup it is listed in) and those last
        seen in memory cgroup `memcg` or below (a process whose main thread has exited is no
        longer listed in cgroup.procs, yet holds its memory there). `members` None: every process."""
        now_mono, now = time.monotonic(), time.time()
        elapsed, self._last = now_mono - self._last, now_mono
        self.reads = 0
        changes = self.events.drain() if self.events is not None else Changes(lost=True)
        # A pid born again (exit, then a fork that reused it) is read again: born wins. An
        # exit is only a hint: the connector says the same when a main thread exits while
        # the others live on (and hold the memory), so the pid is read again, not dropped.
        born, gone, again = set(changes.born) | self._retry, set(), changes.execed | (changes.exited & self.procs.keys())
        self._retry = set()
        if fresh and members is not None:
            born |= members.keys() - self.procs.keys()       # moved into the scope, or missed
        if changes.lost or now_mono - self._listed_at >= LIST_EVERY:
            self._listed_at = now_mono
            listed = {int(n) for n in os.listdir(self.root) if n.isdigit()}
            gone |= self.procs.keys() - listed
            born |= listed - self.procs.keys()
            if self.events is None:
                # Without events an exec is seen only by reading again: once more while young.
                again |= self._young & listed
        # Changed in a copy: the dict handed out last (held by the snapshot and the classifier)
        # is never changed, so it need not be copied on the way out and is the only one held.
        self.procs = dict(self.procs)
        for pid in gone:
            self.procs.pop(pid, None)
        self.changed |= gone
        self.born = sorted(born)
        for pid in self.born:
            self._read(pid)
        self._young = {pid for pid in self.born if pid in self.procs and self._is_young(self.procs[pid], now)}
        light = self._largest()
        # In full, at rest's pace whatever the pressure: what only a full read sees (a cgroup
        # moved within the scope, an exec no event told of) is at most a sweep old.
        # A cycle's share can be a fraction of a process (100 processes at 1 s: a third each
        # cycle): it is carried over, so the sweep keeps the pace sweep_seconds says.
        if self.procs:
            n = len(self.procs)
            self._sweep_due += n * min(1.0, elapsed / self.sweep_seconds) if self.sweep_seconds > 0 else n
            due = int(self._sweep_due)
            if due:
                self._sweep_due -= due
                again.update(self._sweep_next(due))
        if fresh:
            chosen = self._scope(members, memcg, again)
            light += self._rotate(chosen, self.budget)
        for pid in again - born:
            if pid in self.procs:
                self._read(pid)
        for pid in dict.fromkeys(light):
            if pid in self.procs and pid not in again and pid not in born:
                self._reread(pid)
        return self.procs

    def _scope(self, members: dict[int, str | None] | None, memcg: str | None, full: set[int]) -> list[int]:
        """The user processes of the pressed scope; into `full`, those whose memory cgroup is
        not the one cgroup.procs lists them in (moved, or their main thread exited: no longer
        listed), to be read in full."""
        procs = self.procs
        if members is None:
            return [pid for pid, p in procs.items() if not p.kernel_thread]
        chosen = []
        for pid, where in members.items():
            p = procs.get(pid)
            if p is not None and not p.kernel_thread:
                chosen.append(pid)
                if where is not None and where != p.memcg:
                    full.add(pid)
        if memcg:
            below = memcg.rstrip("/") + "/"
            for pid, p in procs.items():
                if pid not in members and not p.kernel_thread and (p.memcg == memcg or p.memcg.startswith(below)):
                    chosen.append(pid)
                    full.add(pid)
        return chosen

    def take_changed(self) -> set[int]:
        """The pids read, born or gone since the last call: a Proc not among them is the same
        object as then."""
        out, self.changed = self.changed, set()
        return out

    def _largest(self) -> list[int]:
        """The `top` largest user processes by their last reading, from the heap of readings."""
        heap, out, keep = self._by_rss, [], []
        while heap and len(out) < self.top:
            entry = heapq.heappop(heap)
            if self._current(entry) and -entry & PID_MASK not in out:     # a pid twice: once
                out.append(-entry & PID_MASK)
                keep.append(entry)
        for entry in keep:
            heapq.heappush(heap, entry)
        kept = KEPT_READINGS * self.top
        if len(heap) > 2 * kept + 64:
            # nsmallest: the most negative entries are the largest; sorted, so already a heap.
            self._by_rss = heapq.nsmallest(kept, {e for e in heap if self._current(e)})
        return out

    def _current(self, entry: int) -> bool:
        p = self.procs.get(-entry & PID_MASK)
        return p is not None and not p.kernel_thread and p.rss_bytes >> 10 == -entry >> PID_BITS

    def _sweep_next(self, n: int) -> list[int]:
        """At rest, the next `n` processes of a round over the table; a new round is listed
        from the table when one ends (once per sweep, not once per cycle)."""
        out: list[int] = []
        while len(out) < n:
            if not self._sweep:
                self._sweep = [pid for pid, p in self.procs.items() if not p.kernel_thread]
                self._sweep.reverse()           # popped from the end: the table's order
                if not self._sweep:
                    break
                n = min(n, len(self._sweep))
            pid = self._sweep.pop()
            if pid in self.procs:
                out.append(pid)
        return out

    def _rotate(self, pids: list[int], n: int) -> list[int]:
        """Under pressure, the next `n` of `pids` in a round that goes on across cycles."""
        if n >= len(pids):
            self._round = []
            return pids
        alive = set(pids)
        self._round = [p for p in self._round if p in alive]
        if len(self._round) < n:
            queued = set(self._round)
            self._round += [p for p in pids if p not in queued]
        out, self._round = self._round[:n], self._round[n:]
        return out
