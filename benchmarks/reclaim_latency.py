"""From the first failing reclaim to the kill: who killed, and how long after, measured by a
tracer of its own (not dbguard's programs, so it times every contender the same way).

What is timed, per SIGKILL: from the beginning of the first failing reclaim of the episode the
target's memory cgroup is in, to the kill being sent. With the kernel's own terms:

  failing reclaim  a limit reclaim of the cgroup (`vmscan:mm_vmscan_memcg_reclaim_begin` ..
                   `_end`) that freed nothing (nr_reclaimed == 0): what the kernel's charge
                   counts toward its OOM killer (16 in a row, MAX_RECLAIM_RETRIES). Its start is
                   the matching _begin, not the _end.
  a task's streak  from its first failing reclaim until it frees something (nr_reclaimed > 0),
                   or its charge went through (a page mapped into its own process:
                   `kmem:rss_stat` of the current mm), or it makes its next syscall (the one
                   that charged is over, whatever ended it), or it exits. Not its return to user
                   space: a fault whose charge failed is retried from there, and fails again.
  episode          of a memory cgroup (the task's own): from the start of a streak while no task
                   of the cgroup had one, until no task of it has one; kills during it are timed
                   from its start (the second kill of an episode too: the cgroup was failing all
                   that time), and say whether they were its first.
  the kill         the SIGKILL's generation (`signal_generate`, result "delivered"), once per
                   process: the decision, not the victim's way out of the kernel.

signal_generate is a raw tracepoint here: a kill sent by another BPF program (bpf_send_signal
from dbguard's tracepoint programs) fires it inside that program, where the kernel runs no
second perf-event tracepoint program (bpf_prog_active), but does run a raw one.

A kill is attributed to
  kernel  the kernel's OOM killer: the same thread marks the same process as its victim
          (`oom:mark_victim`) right after sending it SEND_SIG_PRIV's SIGKILL, with no reclaim of
          its own in between (an already dying task it merely marks was killed by someone else,
          often a BPF program in this very thread, and stays theirs),
  user    else, a SIGKILL from a process (si_code SI_USER/SI_TKILL/SI_QUEUE: kill(),
          pidfd_send_signal()), named by its sender; `harness` senders (the benchmark's own end
          of a round) are their own path,
  bpf     else, a SIGKILL the kernel sent (SI_KERNEL) that the OOM killer did not mark: a BPF
          program's bpf_send_signal / bpf_send_signal_task.

Tracer(sig=2) times SIGINT instead, PostgreSQL's cancel: `user` is pg_cancel_backend (kill() by
dbguard's own backend), `bpf` dbguard's in-kernel cancel; every SIGINT counts. A SIGINT does not
end the waiting allocation (a SIGKILL does): it may be sent once the backend's charge is over,
so it is timed against the episode going on or one that ended within the last second.

Validated against an oracle of its own (tests/e2e/test_reclaim_latency.py: a hog stuck at a
limit with the OOM killer off, killed a known time later; the kernel's and a BPF program's kill).

    python -m benchmarks.reclaim_latency -- CMD ...   # trace while CMD runs, print a summary
"""
from __future__ import annotations

import ctypes as ct
import os
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field

PROGRAM = r"""
struct ev { u64 ts; u64 memcg; u32 pid; u32 sender; s32 code; u32 kind; };
#define EV_KILL 0
#define EV_MARK 1
#define EV_BEGIN 2
#define EV_END 3

BPF_HASH(began, u32, u64, 65536);       /* thread -> its reclaim's _begin, until its _end */
BPF_HASH(streaks, u32, u64, 65536);     /* thread -> the memcg of its failing streak */
BPF_HASH(killed, u32, u64, 65536);      /* SIGKILL: once per process */
BPF_HASH(last_kill, u32, u32, 4096);    /* sending thread -> the process it last killed */
BPF_PERF_OUTPUT(events);

/* Struct fields at the running kernel's BTF offsets (OFF_*): its headers may not match it. */
static __always_inline u64 rd(u64 p, u64 off)
{
    u64 v = 0;
    if (p)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)(p + off));
    return v;
}

static __always_inline u64 memcg_of(u64 task)
{
    u64 css = rd(rd(task, OFF_TASK_CGROUPS), OFF_CSSSET_SUBSYS + 8 * MEMORY_CGRP_ID);
    return rd(rd(rd(css, OFF_CSS_CGROUP), OFF_CGROUP_KN), OFF_KN_ID);   /* the cgroup directory's inode */
}

static __always_inline void end_streak(void *ctx, u32 tid)
{
    if (!streaks.lookup(&tid))
        return;
    streaks.delete(&tid);
    struct ev e = {.ts = bpf_ktime_get_ns(), .pid = tid, .kind = EV_END};
    events.perf_submit(ctx, &e, sizeof(e));
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    began.update(&tid, &now);
    if (last_kill.lookup(&tid))
        last_kill.delete(&tid);     /* a mark after more reclaim is not of that kill */
    return 0;
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 *b = began.lookup(&tid);
    u64 start = b ? *b : bpf_ktime_get_ns();
    began.delete(&tid);
    if (args->nr_reclaimed) {
        end_streak(args, tid);
        return 0;
    }
    if (streaks.lookup(&tid))
        return 0;
    struct ev e = {.ts = start, .pid = tid, .kind = EV_BEGIN,
                   .memcg = memcg_of(bpf_get_current_task())};
    streaks.update(&tid, &e.memcg);
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}

/* A new syscall: the one that charged (if one did) is over, whatever ended it. */
TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    end_streak(args, bpf_get_current_pid_tgid());
    return 0;
}

/* A page mapped into (or out of) its own process: a charge of its went through. */
TRACEPOINT_PROBE(kmem, rss_stat)
{
    if (args->curr)
        end_streak(args, bpf_get_current_pid_tgid());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    began.delete(&tid);
    end_streak(args, tid);
    if (tid == (u32)(id >> 32))
        killed.delete(&tid);
    last_kill.delete(&tid);
    return 0;
}

/* signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task, int group, int result) */
RAW_TRACEPOINT_PROBE(signal_generate)
{
    if ((int)ctx->args[0] != SIG || (int)ctx->args[4] != 0 /* TRACE_SIGNAL_DELIVERED */)
        return 0;
    u64 t = ctx->args[2];
    u32 target = (u32)rd(t, OFF_TASK_TGID);
    struct ev e = {.ts = bpf_ktime_get_ns(), .pid = target, .sender = bpf_get_current_pid_tgid() >> 32,
                   .kind = EV_KILL};
#if SIG == 9
    if (killed.lookup(&target))
        return 0;
    killed.update(&target, &e.ts);
#endif
    u64 info = ctx->args[1];
    u32 tid = bpf_get_current_pid_tgid();
    if (info == 0) {
        e.code = 0;            /* SEND_SIG_NOINFO: SI_USER */
    } else if (info == 1) {
        e.code = 0x80;         /* SEND_SIG_PRIV: SI_KERNEL, as the OOM killer (and bpf_send_signal) sends */
        last_kill.update(&tid, &target);
    } else {
        e.code = (s32)rd(info, OFF_SIGINFO_CODE);   /* bpf_send_signal_task: a siginfo of its own */
    }
    e.memcg = memcg_of(t);
    events.perf_submit(ctx, &e, sizeof(e));
    return 0;
}

/* The OOM killer sends its SIGKILL (SEND_SIG_PRIV), then marks the victim, in the same thread.
 * It also marks a task already dying without a signal of its own (task_will_free_mem): one
 * killed by a BPF program, maybe from this very thread; so a mark counts only for a
 * SEND_SIG_PRIV kill with no reclaim of the thread since (bpf_send_signal_task's siginfo is
 * its own; bpf_send_signal kills the current task at its reclaim's end, which reclaims again
 * before the OOM killer, unless that was its very last try: a case left). */
TRACEPOINT_PROBE(oom, mark_victim)
{
    u32 tid = bpf_get_current_pid_tgid();
    u32 *k = last_kill.lookup(&tid);
    if (!k || *k != (u32)args->pid)
        return 0;
    struct ev e = {.ts = bpf_ktime_get_ns(), .pid = args->pid, .kind = EV_MARK};
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""

SI_KERNEL = 0x80
# What a record's "tracer" says: v2 attributed to the kernel a BPF kill the OOM killer marked
# afterwards (its task_will_free_mem path); v3 does not. Both time alike.
VERSION = "v3"
TIMED_ALIKE = ("v2", "v3")
PATHS = ("kernel", "user", "bpf", "harness")
KILL, MARK, BEGIN, END = range(4)
RECENT_NS = 1_000_000_000      # SIGINT: an episode that ended this recently still counts


class _Ev(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("memcg", ct.c_uint64), ("pid", ct.c_uint32), ("sender", ct.c_uint32),
                ("code", ct.c_int32), ("kind", ct.c_uint32)]


@dataclass(frozen=True)
class Event:
    """One record of the tracer's program: a streak's begin or end (pid: the thread), a signal
    sent (pid: the target process), or the OOM killer's mark of a victim it just killed."""
    ts: int
    kind: int
    pid: int
    memcg: int = 0
    sender: int = 0
    code: int = 0


@dataclass
class Kill:
    target: int
    path: str
    ms: float | None        # from the start of its cgroup's failing episode; None: none was going on
    sender: int = 0
    first: bool = False     # the episode's first kill
    memcg: int = 0          # the target's memory cgroup (its directory's inode number)


def path_of(code: int, sender: int, harness: set[int]) -> str:
    """A signal's path by its siginfo code and sender ("kernel" comes from the OOM killer's mark)."""
    if code == SI_KERNEL:
        return "bpf"
    return "harness" if sender in harness else "user"


def timed_kills(events: list[Event], harness: set[int], sig: int = 9) -> list[Kill]:
    """The kills in `events` (any order), each timed from the start of the failing episode of
    its target's memory cgroup: the earliest streak begin since a moment when no thread of the
    cgroup had a streak going (for SIGINT, also an episode that ended within RECENT_NS)."""
    marked = {e.pid for e in events if e.kind == MARK}
    going: dict[int, dict[int, int]] = {}          # memcg -> {thread: its streak's begin}
    thread_memcg: dict[int, int] = {}
    start: dict[int, int] = {}                      # memcg -> its episode's start
    ended: dict[int, int] = {}                      # memcg -> when its last episode ended
    kills_in: dict[int, int] = {}                   # memcg -> kills in its episode so far
    out = []
    for e in sorted(events, key=lambda e: (e.ts, e.kind != END)):   # an end before a begin at the same ns
        if e.kind == BEGIN:
            tids = going.setdefault(e.memcg, {})
            if not tids:
                start[e.memcg], kills_in[e.memcg] = e.ts, 0
            tids[e.pid] = e.ts
            thread_memcg[e.pid] = e.memcg
        elif e.kind == END and (m := thread_memcg.pop(e.pid, None)) is not None:
            going[m].pop(e.pid, None)
            if not going[m]:
                ended[m] = e.ts
        elif e.kind == KILL:
            t0, first = None, False
            if going.get(e.memcg):
                t0 = start[e.memcg]
                kills_in[e.memcg] += 1
                first = kills_in[e.memcg] == 1
            elif sig != 9 and e.memcg in ended and e.ts - ended[e.memcg] < RECENT_NS:
                t0 = start[e.memcg]
            path = "kernel" if sig == 9 and e.pid in marked else path_of(e.code, e.sender, harness)
            out.append(Kill(e.pid, path, (e.ts - t0) / 1e6 if t0 is not None else None, e.sender, first, e.memcg))
    return out


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank percentile of xs (q in 0..1)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


@dataclass
class Latencies:
    """Every kill seen, with the milliseconds from the first failing reclaim, by path."""
    kills: list[Kill] = field(default_factory=list)
    lost: int = 0           # events the perf buffer dropped (the figures are incomplete if any)

    def of(self, pids) -> "Latencies":
        pids = set(pids)
        return Latencies([k for k in self.kills if k.target in pids], self.lost)

    @property
    def ms(self) -> dict[str, list[float]]:
        return {p: [k.ms for k in self.kills if k.path == p and k.ms is not None] for p in PATHS}

    @property
    def first_ms(self) -> dict[str, list[float]]:
        """As ms, the first kill of each episode only."""
        return {p: [k.ms for k in self.kills if k.path == p and k.ms is not None and k.first] for p in PATHS}

    def summary(self, noun: str = "kills") -> dict:
        out = {}
        for path in PATHS:
            xs, firsts = self.ms[path], self.first_ms[path]
            out[path] = {noun: sum(k.path == path for k in self.kills),
                         "without_failing_reclaim": sum(k.path == path and k.ms is None for k in self.kills),
                         "median_ms": statistics.median(xs) if xs else None, "p99_ms": percentile(xs, 0.99),
                         "first_of_episode": len(firsts),
                         "first_median_ms": statistics.median(firsts) if firsts else None}
        return out


def defines(sig: int) -> dict[str, int]:
    """The program's #defines: the signal, and the running kernel's struct offsets from its BTF."""
    from dbguard.kernel.btf import VMLINUX_BTF, kernel_offsets, parse_btf
    btf, known = parse_btf(VMLINUX_BTF.read_bytes()), kernel_offsets()
    out = {"SIG": int(sig), "OFF_TASK_TGID": btf.offset("task_struct", "tgid"),
           "OFF_SIGINFO_CODE": btf.offset("kernel_siginfo", "si_code"),
           "MEMORY_CGRP_ID": known["DBG_MEMORY_CGRP_ID"]}
    for name in ("TASK_CGROUPS", "CSSSET_SUBSYS", "CSS_CGROUP", "CGROUP_KN", "KN_ID"):
        out[f"OFF_{name}"] = known[f"DBG_OFF_{name}"]
    return out


class Tracer:
    """with Tracer() as t: ...; then t.latencies (computed at exit). `pids`: only kills of
    these; `harness`: senders whose kills are the harness's own (default: this process)."""

    def __init__(self, pids: set[int] | None = None, sig: int = 9, harness: set[int] | None = None):
        self.latencies = Latencies()
        self._sig = sig
        self._pids = pids
        self._harness = {os.getpid()} if harness is None else set(harness)
        self._halt = threading.Event()
        self._events: list[Event] = []
        self._lost = 0

    def __enter__(self) -> "Tracer":
        from bcc import BPF
        self._b = BPF(text=("".join(f"#define {k} {v}\n" for k, v in defines(self._sig).items()) + PROGRAM).encode())
        self._b[b"events"].open_perf_buffer(self._on, page_cnt=1024, lost_cb=self._on_lost)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    @property
    def targets(self) -> set[int]:
        """Every process the signal was sent to while tracing (generated with the result
        "delivered": a SIGINT its target ignores, as some of PostgreSQL's auxiliaries do, is not
        among them)."""
        return {k.target for k in self.latencies.kills}

    def _loop(self) -> None:
        while not self._halt.is_set():
            self._b.perf_buffer_poll(100)

    def _on(self, _cpu, data, _size) -> None:
        e = ct.cast(data, ct.POINTER(_Ev)).contents
        self._events.append(Event(e.ts, e.kind, e.pid, e.memcg, e.sender, e.code))

    def _on_lost(self, n) -> None:
        self._lost += n

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join(2)
        self._b.perf_buffer_poll(100)
        self._b.cleanup()
        kills = timed_kills(self._events, self._harness, self._sig)
        if self._pids is not None:
            kills = [k for k in kills if k.target in self._pids]
        self.latencies = Latencies(kills, self._lost)


def main(argv: list[str]) -> int:
    import json
    if "--" not in argv:
        print(__doc__)
        return 2
    cmd = argv[argv.index("--") + 1:]
    with Tracer() as t:
        rc = subprocess.call(cmd)
    print(json.dumps(t.latencies.summary(), indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
