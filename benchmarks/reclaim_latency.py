"""From the first failing reclaim to the kill: who killed, and how long after, measured by a
tracer of its own (not dbguard's programs, so it times every contender the same way).

A small BCC program records, per process, when its current streak of failed reclaims began
(`vmscan:mm_vmscan_memcg_reclaim_end` with nr_reclaimed == 0; a reclaim that frees pages ends
the streak), every SIGKILL sent (`signal:signal_generate`) with its sender, every kernel OOM
victim (`oom:mark_victim`), and the SIGKILL's delivery in the target (`signal:signal_deliver`,
once per process). A kill is attributed to:
  kernel  the kernel OOM killer sent it and marked the target as its victim,
  user    another process sent it (dbguard's pidfd kill, earlyoom, ...),
  bpf     no sender was seen: a BPF program sent it (dbguard's in-kernel kill; tracing
          programs do not run inside another BPF program, so its signal_generate is unseen);
its latency is the delivery's time minus the start of the target's failing streak.

    python -m benchmarks.reclaim_latency -- CMD ...   # trace while CMD runs, print a summary
"""
from __future__ import annotations

import ctypes as ct
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field

PROGRAM = r"""
struct sent { u64 ts; u32 sender; u32 pad; };
struct kill_ev { u64 ts; u64 first; u64 sent_ts; u32 target; u32 sender; u32 kind; u32 pad; };
BPF_HASH(first_fail, u32, u64, 65536);
BPF_HASH(victims, u32, u64, 4096);
BPF_HASH(sent, u32, struct sent, 4096);
BPF_HASH(delivered, u32, u64, 4096);
BPF_PERF_OUTPUT(kills);

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (args->nr_reclaimed) {
        first_fail.delete(&tgid);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    first_fail.lookup_or_try_init(&tgid, &now);
    return 0;
}

TRACEPOINT_PROBE(oom, mark_victim)
{
    u32 pid = args->pid;
    u64 now = bpf_ktime_get_ns();
    victims.update(&pid, &now);
    return 0;
}

/* Not seen when the sender is itself a BPF program (no tracing program runs inside another):
 * a SIGKILL delivered without one was sent by dbguard's in-kernel kill. */
TRACEPOINT_PROBE(signal, signal_generate)
{
    if (args->sig != 9)
        return 0;
    u32 target = args->pid;
    struct sent s = {.ts = bpf_ktime_get_ns(), .sender = bpf_get_current_pid_tgid() >> 32};
    sent.lookup_or_try_init(&target, &s);
    return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver)
{
    if (args->sig != 9)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 now = bpf_ktime_get_ns();
    if (delivered.lookup(&tgid))
        return 0;
    delivered.update(&tgid, &now);
    struct kill_ev ev = {.ts = now, .target = tgid};
    u64 *f = first_fail.lookup(&tgid);
    ev.first = f ? *f : 0;
    struct sent *s = sent.lookup(&tgid);
    if (s) {
        ev.sent_ts = s->ts;
        ev.sender = s->sender;
        ev.kind = victims.lookup(&tgid) ? 2 : 0;
    } else {
        ev.kind = 1;
    }
    kills.perf_submit(args, &ev, sizeof(ev));
    return 0;
}
"""

PATHS = {0: "user", 1: "bpf", 2: "kernel"}


class _Ev(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("first", ct.c_uint64), ("sent_ts", ct.c_uint64), ("target", ct.c_uint32),
                ("sender", ct.c_uint32), ("kind", ct.c_uint32), ("pad", ct.c_uint32)]


@dataclass
class Latencies:
    """Milliseconds from the first failing reclaim to the SIGKILL, by path."""
    ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS.values()})
    without_streak: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PATHS.values()})

    def summary(self) -> dict:
        out = {}
        for path, xs in self.ms.items():
            xs = sorted(xs)
            out[path] = {"kills": len(xs), "without_failing_reclaim": self.without_streak[path],
                         "median_ms": statistics.median(xs) if xs else None,
                         "p99_ms": xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))] if xs else None}
        return out


class Tracer:
    """with Tracer() as t: ...; t.latencies.summary()"""

    def __init__(self, pids: set[int] | None = None):
        self.latencies = Latencies()
        self._pids = pids          # only kills of these targets, when given
        self._halt = threading.Event()

    def __enter__(self) -> "Tracer":
        from bcc import BPF
        self._b = BPF(text=PROGRAM)
        self._b[b"kills"].open_perf_buffer(self._on)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._halt.is_set():
            self._b.perf_buffer_poll(100)

    def _on(self, _cpu, data, _size) -> None:
        ev = ct.cast(data, ct.POINTER(_Ev)).contents
        if self._pids is not None and ev.target not in self._pids:
            return
        path = PATHS.get(ev.kind, "user")
        if ev.first:
            self.latencies.ms[path].append((ev.ts - ev.first) / 1e6)
        else:
            self.latencies.without_streak[path] += 1

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join(2)
        self._b.perf_buffer_poll(100)
        self._b.cleanup()


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
