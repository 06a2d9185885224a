"""From the first failing reclaim to the kill: who killed, and how long after, measured by a
tracer of its own (not dbguard's programs, so it times every contender the same way).

A small BCC program records, per process, when its current streak of failed reclaims began
(`vmscan:mm_vmscan_memcg_reclaim_end` with nr_reclaimed == 0; a reclaim that frees pages ends
the streak), every SIGKILL sent (`signal:signal_generate`) with its sender and si_code, and
the SIGKILL's delivery in the target (`signal:signal_deliver`, once per process). A kill is
attributed to:
  kernel  the kernel OOM killer: its own log says "Killed process PID" (the kernel's record;
          a task it merely reaps after another's SIGKILL is not logged, nor counted as a kill),
  user    else, si_code SI_USER: a process's kill() or pidfd_send_signal() (dbguard's pidfd
          kill, earlyoom),
  bpf     else, si_code SI_KERNEL: a BPF program's bpf_send_signal or bpf_send_signal_task
          (dbguard's in-kernel kill);
its latency is the delivery's time minus the start of the target's failing streak.

Tracer(sig=2) times SIGINT instead, PostgreSQL's cancel: `user` is pg_cancel_backend (kill() by
dbguard's own backend), `bpf` dbguard's in-kernel cancel; every delivery counts (a backend's
statements can be cancelled one after another). A SIGINT does not end the allocation that is
waiting (a SIGKILL does): it is delivered once a reclaim freed something and the allocation got
its memory, which ends the streak, so it is timed against the streak going on or one that
ended within the last second.

    python -m benchmarks.reclaim_latency -- CMD ...   # trace while CMD runs, print a summary
"""
from __future__ import annotations

import ctypes as ct
import re
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field

PROGRAM = r"""
struct sent { u64 ts; u32 sender; s32 code; };
struct kill_ev { u64 ts; u64 first; u64 sent_ts; u32 target; u32 sender; u32 kind; u32 pad; };
BPF_HASH(first_fail, u32, u64, 65536);
BPF_HASH(last_first, u32, u64, 65536);   /* the start of the last streak that ended (SIGINT) */
BPF_HASH(sent, u32, struct sent, 4096);
BPF_HASH(delivered, u32, u64, 4096);
BPF_PERF_OUTPUT(kills);

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (args->nr_reclaimed) {
#if SIG != 9
        u64 *f = first_fail.lookup(&tgid);
        if (f) {
            u64 began = *f;
            last_first.update(&tgid, &began);
        }
#endif
        first_fail.delete(&tgid);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    first_fail.lookup_or_try_init(&tgid, &now);
    return 0;
}

TRACEPOINT_PROBE(signal, signal_generate)
{
    if (args->sig != SIG)
        return 0;
    u32 target = args->pid;
    struct sent s = {.ts = bpf_ktime_get_ns(), .sender = bpf_get_current_pid_tgid() >> 32, .code = args->code};
    sent.lookup_or_try_init(&target, &s);
    return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver)
{
    if (args->sig != SIG)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 now = bpf_ktime_get_ns();
#if SIG == 9
    if (delivered.lookup(&tgid))
        return 0;               /* one SIGKILL per process: its other threads see it too */
    delivered.update(&tgid, &now);
#endif
    struct kill_ev ev = {.ts = now, .target = tgid};
    u64 *f = first_fail.lookup(&tgid);
#if SIG != 9
    if (!f) {       /* a streak that ended within the last second, not an older one */
        f = last_first.lookup(&tgid);
        if (f && now - *f > 1000000000)
            f = 0;
    }
#endif
    ev.first = f ? *f : 0;
    struct sent *s = sent.lookup(&tgid);
    ev.kind = 3;                       /* not seen sent */
    if (s) {
        ev.sent_ts = s->ts;
        ev.sender = s->sender;
        ev.kind = s->code == 0x80 /* SI_KERNEL */ ? 1 : 0;
    }
    kills.perf_submit(args, &ev, sizeof(ev));
    sent.delete(&tgid);
    return 0;
}
"""

PATHS = {0: "user", 1: "bpf", 3: "unseen"}     # "kernel": from the kernel log, at the end
_KERNEL_KILL = re.compile(r"Killed process (\d+) \(")


class _Ev(ct.Structure):
    _fields_ = [("ts", ct.c_uint64), ("first", ct.c_uint64), ("sent_ts", ct.c_uint64), ("target", ct.c_uint32),
                ("sender", ct.c_uint32), ("kind", ct.c_uint32), ("pad", ct.c_uint32)]


@dataclass
class Kill:
    target: int
    path: str
    ms: float | None       # from the start of the target's failing streak; None: it had none


@dataclass
class Latencies:
    """Every SIGKILL seen, with the milliseconds from the first failing reclaim, by path."""
    kills: list[Kill] = field(default_factory=list)

    def of(self, pids) -> "Latencies":
        pids = set(pids)
        return Latencies([k for k in self.kills if k.target in pids])

    @property
    def ms(self) -> dict[str, list[float]]:
        return {p: [k.ms for k in self.kills if k.path == p and k.ms is not None] for p in (*PATHS.values(), "kernel")}

    def summary(self, noun: str = "kills") -> dict:
        out = {}
        for path, xs in self.ms.items():
            xs = sorted(xs)
            out[path] = {noun: sum(k.path == path for k in self.kills),
                         "without_failing_reclaim": sum(k.path == path and k.ms is None for k in self.kills),
                         "median_ms": statistics.median(xs) if xs else None,
                         "p99_ms": xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))] if xs else None}
        return out


class Tracer:
    """with Tracer() as t: ...; t.latencies.summary()"""

    def __init__(self, pids: set[int] | None = None, sig: int = 9):
        self.latencies = Latencies()
        # Targets the signal was sent to but never delivered to (ignored, as SIGINT by some of
        # PostgreSQL's auxiliary processes, or the target gone): pid -> sender's tgid.
        self.undelivered: dict[int, int] = {}
        self._sig = sig
        self._pids = pids          # only kills of these targets, when given
        self._halt = threading.Event()

    def __enter__(self) -> "Tracer":
        from bcc import BPF

        from lab.watch import Kmsg
        self._kmsg = Kmsg()
        self._b = BPF(text=f"#define SIG {int(self._sig)}\n" + PROGRAM)
        self._b[b"kills"].open_perf_buffer(self._on)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    @property
    def targets(self) -> set[int]:
        """Every pid the signal was sent to while tracing, delivered or not."""
        return {k.target for k in self.latencies.kills} | set(self.undelivered)

    def _loop(self) -> None:
        while not self._halt.is_set():
            self._b.perf_buffer_poll(100)

    def _on(self, _cpu, data, _size) -> None:
        ev = ct.cast(data, ct.POINTER(_Ev)).contents
        if self._pids is not None and ev.target not in self._pids:
            return
        self.latencies.kills.append(Kill(ev.target, PATHS.get(ev.kind, "unseen"),
                                         (ev.ts - ev.first) / 1e6 if ev.first else None))

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join(2)
        self._b.perf_buffer_poll(100)
        self.undelivered = {int(k.value): int(v.sender) for k, v in self._b[b"sent"].items()}
        self._b.cleanup()
        by_kernel = {int(m.group(1)) for line in self._kmsg.read() if (m := _KERNEL_KILL.search(line))}
        self._kmsg.close()
        for k in self.latencies.kills:
            if k.target in by_kernel:
                k.path = "kernel"


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
