/* The state the sidecar keeps current, and the helpers every program uses.
 * Hash maps are no-prealloc: most slots stay empty, so they cost only their buckets. */
#include "dbguard.h"

BPF_F_TABLE("hash", u32, struct dbg_proc, procs, DBG_MAX_PROCS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct dbg_cgroup, cgroups, DBG_MAX_CGROUPS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct dbg_exe, u32, exes, DBG_MAX_EXES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct dbg_scope, scopes, DBG_MAX_SCOPES, BPF_F_NO_PREALLOC);   /* memcg id -> depth, level */
/* LRU: a streak needs no bookkeeping by the sidecar, and a full map forgets the oldest. */
BPF_TABLE("lru_hash", u32, struct dbg_streak, streaks, DBG_MAX_STREAKS);
BPF_ARRAY(policy, struct dbg_policy, 1);
BPF_PERCPU_ARRAY(counters, u64, DBG_NR_COUNTERS);
BPF_ARRAY(last_wake, u64, 1);       /* when the last DBG_EV_RECLAIM_FAIL was sent */
BPF_ARRAY(victims, struct dbg_victim, DBG_VICTIM_SLOTS + DBG_LISTED_VICTIMS);
#ifdef DBG_RINGBUF
BPF_RINGBUF_OUTPUT(events, DBG_EVENT_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

#ifdef DBG_HAVE_SIGNAL_TASK
/* kfuncs, called as helpers with placeholder ids that dbguard.kernel.kfuncs rewrites into
 * kfunc calls at load (BCC cannot declare them). */
static void *(*dbg_task_from_pid)(s32 pid) = (void *)DBG_KF_TASK_FROM_PID;
static void (*dbg_task_release)(void *task) = (void *)DBG_KF_TASK_RELEASE;
static int (*dbg_send_signal_task)(void *task, int sig, int type, u64 value) = (void *)DBG_KF_SEND_SIGNAL_TASK;
#define DBG_PIDTYPE_TGID 1
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

/* --- the current task, read at offsets from the running kernel's BTF (dbguard/kernel/btf.py):
 * the installed headers may be another kernel's, so no struct is dereferenced by name. */

static __always_inline u64 dbg_ptr(u64 base, u64 off)
{
    u64 v = 0;
    if (base)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

static __always_inline u32 dbg_u32(u64 base, u64 off)
{
    u32 v = 0;
    if (base)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)(base + off));
    return v;
}

/* Kernel threads, PID 1 and dbguard itself are never killed, listed or not. */
static __always_inline int dbg_untouchable(struct dbg_policy *pol, u64 task, u32 tgid)
{
    return tgid <= 1 || tgid == pol->self_tgid || (dbg_u32(task, DBG_OFF_TASK_FLAGS) & DBG_PF_KTHREAD);
}

/* A task that was killed (SIGKILL pending) or is exiting: it gives its memory back by itself. */
static __always_inline int dbg_dying(u64 task)
{
    return (dbg_u32(task, DBG_OFF_TASK_FLAGS) & DBG_PF_EXITING) ||
           (dbg_ptr(task, DBG_OFF_TASK_PENDING) & DBG_SIGKILL_BIT);
}

/* Start of the current process (its thread-group leader) in /proc/PID/stat's ticks. */
static __always_inline u64 dbg_start_ticks(u64 task)
{
    u64 leader = dbg_ptr(task, DBG_OFF_TASK_LEADER);
    return dbg_ptr(leader, DBG_OFF_TASK_START) / DBG_NSEC_PER_TICK;
}

/* The current task's procs entry, unless it was written for an earlier holder of the pid. */
static __always_inline struct dbg_proc *dbg_entry(u32 tgid, u64 task)
{
    struct dbg_proc *p = procs.lookup(&tgid);
    if (p && p->start && p->start != dbg_start_ticks(task)) {
        dbg_count(DBG_CTR_STALE_ENTRIES);
        return 0;
    }
    return p;
}

static __always_inline u64 dbg_ancestor_id(u64 cgrp, u32 level)
{
    u64 anc = dbg_ptr(cgrp, DBG_OFF_CGROUP_ANCESTORS + 8 * (u64)(level & 0xff));
    return anc ? dbg_ptr(dbg_ptr(anc, DBG_OFF_CGROUP_KN), DBG_OFF_KN_ID) : 0;
}

/* The scope of the set that is the cgroup's ancestor at `level` (a constant), its id in *id;
 * 0 when there is none or the cgroup lies above that level. */
static __always_inline struct dbg_scope *dbg_scope_at(u64 cgrp, u32 depth, u32 level, u64 *id)
{
    if (level > depth)
        return 0;
    *id = dbg_ancestor_id(cgrp, level);
    return *id ? scopes.lookup(id) : 0;
}

/* The watched scope holding the task's memory cgroup: its key (the scope cgroup's id,
 * DBG_SCOPE_HOST for the host), 0 when none does. One read of the cgroup's ancestor at the
 * scope's depth (struct cgroup keeps ancestors[] by level). With a set of scopes, the innermost
 * one holding it (as the sidecar's owner()), and *level is that scope's own level (else left
 * as the caller set it). The set's levels are written out, deepest first: a loop over them,
 * which older clang (LLVM 14, Debian bookworm) does not unroll, becomes a countdown on the
 * cgroup's depth whose bound Linux 6.1's verifier loses ("The sequence of 8193 jumps is too
 * complex"). */
#define DBG_SCOPE_AT(l) do { struct dbg_scope *sc = dbg_scope_at(cgrp, depth, l, &id); \
                             if (sc) { *level = sc->level; return id; } } while (0)
_Static_assert(DBG_SCOPE_DEPTH == 16, "dbg_scope_of looks at levels 15 .. 1");

static __always_inline u64 dbg_scope_of(struct dbg_policy *pol, u64 task, u32 *level)
{
    if (pol->scope == DBG_SCOPE_ALL)
        return DBG_SCOPE_HOST;
    if (pol->scope != DBG_SCOPE_CGROUP && pol->scope != DBG_SCOPE_SET)
        return 0;
    u64 cset = dbg_ptr(task, DBG_OFF_TASK_CGROUPS);
    u64 css = dbg_ptr(cset, DBG_OFF_CSSSET_SUBSYS + 8 * DBG_MEMORY_CGRP_ID);
    u64 cgrp = dbg_ptr(css, DBG_OFF_CSS_CGROUP);
    if (!cgrp)
        return 0;
    u32 depth = dbg_u32(cgrp, DBG_OFF_CGROUP_LEVEL);
    if (pol->scope == DBG_SCOPE_SET) {
        u64 id = 0;
        DBG_SCOPE_AT(15); DBG_SCOPE_AT(14); DBG_SCOPE_AT(13); DBG_SCOPE_AT(12); DBG_SCOPE_AT(11);
        DBG_SCOPE_AT(10); DBG_SCOPE_AT(9); DBG_SCOPE_AT(8); DBG_SCOPE_AT(7); DBG_SCOPE_AT(6);
        DBG_SCOPE_AT(5); DBG_SCOPE_AT(4); DBG_SCOPE_AT(3); DBG_SCOPE_AT(2); DBG_SCOPE_AT(1);
        return 0;
    }
    if (depth < pol->scope_level)
        return 0;
    return dbg_ancestor_id(cgrp, pol->scope_level) == pol->scope_id ? pol->scope_id : 0;
}

/* Whether the task's memory cgroup is a watched scope or below one. */
static __always_inline int dbg_in_scope(struct dbg_policy *pol, u64 task)
{
    u32 level = 0;
    return dbg_scope_of(pol, task, &level) != 0;
}

/* Whether the task runs a database server's executable (file identity, set by the sidecar). */
static __always_inline int dbg_db_exe(u64 task)
{
    u64 mm = dbg_ptr(task, DBG_OFF_TASK_MM);
    u64 inode = dbg_ptr(dbg_ptr(mm, DBG_OFF_MM_EXE), DBG_OFF_FILE_INODE);
    if (!inode)
        return 0;
    struct dbg_exe key = {};
    key.ino = dbg_ptr(inode, DBG_OFF_INODE_INO);
    key.dev = dbg_u32(dbg_ptr(inode, DBG_OFF_INODE_SB), DBG_OFF_SB_DEV);
    return exes.lookup(&key) != 0;
}

static __always_inline s64 dbg_anon_pages(u64 task)
{
    s64 v = 0;
    u64 mm = dbg_ptr(task, DBG_OFF_TASK_MM);
    if (mm)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)(mm + DBG_OFF_MM_ANON_PAGES));
    return v;
}

/* A victim killed, or gone, is no longer one. */
static __always_inline void dbg_forget_victim(u32 tgid)
{
#pragma unroll
    for (int i = 0; i < DBG_VICTIM_SLOTS + DBG_LISTED_VICTIMS; i++) {
        int k = i;
        struct dbg_victim *v = victims.lookup(&k);
        if (v && v->tgid == tgid)
            v->tgid = 0;
    }
}
