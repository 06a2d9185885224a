"""Floor costs of BPF map lookups on this machine, to read benchmarks/bpf/run.py against.

    sudo .venv/bin/python -m benchmarks.bpf.lookup_cost

Six programs on task:task_newtask (empty, pid/tgid helper, array lookup, hash-miss lookups
in maps of different sizes and allocation modes), 5 rounds of 1000 forks; prints the
median over rounds of run_time_ns/run_cnt for each.
"""
import statistics
import subprocess
import sys
from pathlib import Path
from bcc import BPF
src = r"""
BPF_F_TABLE("hash", u32, u64, hn16k, 16384, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u32, u64, hn1k, 1024, BPF_F_NO_PREALLOC);
BPF_HASH(hp16k, u32, u64, 16384);
BPF_ARRAY(arr, u64, 1);
int empty(void *ctx) { return 0; }
int pidtgid(void *ctx) { u32 k = bpf_get_current_pid_tgid() >> 32; return k == 1; }
int arrl(void *ctx) { int k = 0; u64 *v = arr.lookup(&k); return v ? 1 : 0; }
int noprealloc16k(void *ctx) { u32 k = bpf_get_current_pid_tgid() >> 32; return hn16k.lookup(&k) ? 1 : 0; }
int noprealloc1k(void *ctx) { u32 k = bpf_get_current_pid_tgid() >> 32; return hn1k.lookup(&k) ? 1 : 0; }
int prealloc16k(void *ctx) { u32 k = bpf_get_current_pid_tgid() >> 32; return hp16k.lookup(&k) ? 1 : 0; }
"""
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
old = STATS.read_text().strip()
STATS.write_text("1")
b = BPF(text=src.encode())
names = ["empty","pidtgid","arrl","noprealloc16k","noprealloc1k","prealloc16k"]
for n in names:
    b.attach_tracepoint(tp="task:task_newtask", fn_name=n)
def st():
    out = {}
    for n in names:
        fd = b.funcs[n.encode()].fd
        d = dict(l.split(":\t") for l in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":\t" in l)
        out[n] = (int(d["run_time_ns"]), int(d["run_cnt"]))
    return out
res = {n: [] for n in names}
for r in range(5):
    s0 = st()
    subprocess.run([sys.executable, "-c", "import os\nfor _ in range(1000):\n    p=os.fork()\n    if p==0: os._exit(0)\n    os.waitpid(p,0)"])
    s1 = st()
    for n in names:
        t, c = s1[n][0]-s0[n][0], s1[n][1]-s0[n][1]
        res[n].append(t/c)
for n in names: print(n, round(statistics.median(res[n])))
STATS.write_text(old)
b.cleanup()
