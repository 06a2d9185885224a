/* The state the sidecar keeps current, and the helpers every program uses.
 * Hash maps are no-prealloc: most slots stay empty, so they cost only their buckets. */
#include "dbguard.h"

BPF_F_TABLE("hash", u32, struct dbg_proc, procs, DBG_MAX_PROCS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct dbg_cgroup, cgroups, DBG_MAX_CGROUPS, BPF_F_NO_PREALLOC);
BPF_ARRAY(policy, struct dbg_policy, 1);
BPF_PERCPU_ARRAY(counters, u64, DBG_NR_COUNTERS);
#ifdef DBG_RINGBUF
BPF_RINGBUF_OUTPUT(events, DBG_EVENT_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

static __always_inline void dbg_count(int idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline struct dbg_policy *dbg_policy(void)
{
    int zero = 0;
    return policy.lookup(&zero);
}

static __always_inline void dbg_emit(void *ctx, struct dbg_event *ev)
{
    ev->ts_ns = bpf_ktime_get_ns();
    ev->cgroup_id = bpf_get_current_cgroup_id();
#ifdef DBG_RINGBUF
    if (events.ringbuf_output(ev, sizeof(*ev), 0))
        dbg_count(DBG_CTR_EVENTS_DROPPED);
#else
    if (events.perf_submit(ctx, ev, sizeof(*ev)))
        dbg_count(DBG_CTR_EVENTS_DROPPED);
#endif
}
