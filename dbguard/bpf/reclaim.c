/* Kill the allocating kill candidate when reclaim keeps failing and the sidecar's level allows.
 *
 * Reclaim alone is normal (a cgroup full of page cache reclaims all day), so a kill needs
 * both the sidecar's level and the kernel's own verdict: `fail_streak` reclaims in a row
 * that freed at most `fail_pages` pages, counted from the ..._reclaim_end events per
 * candidate tgid (or per cgroup for cgroup policies). BPF can signal only the current
 * task, which here is the one allocating. */
#include "dbguard.h"

static __always_inline int dbg_gate(struct dbg_policy *pol, u32 fails, u32 reported)
{
    return pol->enabled && pol->level >= pol->min_level_to_kill &&
           fails >= pol->fail_streak && !reported;
}

static __always_inline void dbg_kill(void *ctx, struct dbg_policy *pol, u32 tier, u32 evflags, u32 fails)
{
    u64 id = bpf_get_current_pid_tgid();
    struct dbg_event ev = {};
    ev.pid = (u32)id;
    ev.tgid = id >> 32;
    ev.level = pol->level;
    ev.flags = evflags;
    ev.tier = tier;
    ev.a = fails;
    ev.by_pid = (u32)id;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (pol->dry_run) {
        ev.kind = DBG_EV_WOULD_KILL;
        dbg_count(DBG_CTR_WOULD_KILLS);
    } else {
        ev.c = bpf_send_signal(9);
        ev.kind = DBG_EV_KILL;
        dbg_count(ev.c ? DBG_CTR_KILL_ERRORS : DBG_CTR_KILLS);
    }
    dbg_emit(ctx, &ev);
}

static __always_inline int dbg_reclaim_begin(void *ctx)
{
    /* Reclaim evicts caches: every cache line touched here is likely a miss, so the
     * common cases (untracked, protected) touch as few as possible. */
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *fails, *reported, tier, evflags;
    struct dbg_proc *p = procs.lookup(&tgid);
    if (p && (p->flags & DBG_SHIELD)) {
        dbg_count(DBG_CTR_RECLAIM_PROTECTED);
        return 0;
    }
    struct dbg_policy *pol = dbg_policy();
    if (!pol)
        return 0;
    if (p) {
        if (!(p->flags & DBG_CANDIDATE))
            return 0;
        fails = &p->fails;
        reported = &p->reported;
        tier = p->cand_tier;
        evflags = DBG_EVF_CANDIDATE;
    } else {
        if (!pol->n_cgroups)
            return 0;
        u64 cg = bpf_get_current_cgroup_id();
        struct dbg_cgroup *c = cgroups.lookup(&cg);
        if (!c)
            return 0;
        if (c->action == DBG_ACTION_SHIELD) {
            dbg_count(DBG_CTR_RECLAIM_PROTECTED);
            return 0;
        }
        if (c->action != DBG_ACTION_KILL)
            return 0;
        fails = &c->fails;
        reported = &c->reported;
        tier = c->tier;
        evflags = DBG_EVF_CANDIDATE | DBG_EVF_BY_CGROUP;
    }
    if (!dbg_gate(pol, *fails, *reported))
        return 0;
    *reported = 1;
    dbg_kill(ctx, pol, tier, evflags, *fails);
    return 0;
}

static __always_inline void dbg_streak(struct dbg_policy *pol, unsigned long nr_reclaimed,
                                       u32 *fails, u32 *reported)
{
    if (nr_reclaimed <= pol->fail_pages) {
        __sync_fetch_and_add(fails, 1);
        dbg_count(DBG_CTR_RECLAIM_FAILED);
    } else if (*fails) {
        *fails = 0;
        *reported = 0;
    }
}

/* Streaks are kept only where a kill could follow: kill candidates, and cgroups whose
 * policy says kill. Untracked tasks cost one hash-bucket read. */
static __always_inline int dbg_reclaim_end(unsigned long nr_reclaimed)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct dbg_proc *p = procs.lookup(&tgid);
    if (p && !(p->flags & DBG_CANDIDATE))
        return 0;
    struct dbg_policy *pol = dbg_policy();
    if (!pol)
        return 0;
    if (p) {
        dbg_streak(pol, nr_reclaimed, &p->fails, &p->reported);
        return 0;
    }
    if (!pol->n_cgroups)
        return 0;
    u64 cg = bpf_get_current_cgroup_id();
    struct dbg_cgroup *c = cgroups.lookup(&cg);
    if (c && c->action == DBG_ACTION_KILL)
        dbg_streak(pol, nr_reclaimed, &c->fails, &c->reported);
    return 0;
}

/* The direct-reclaim programs only jump to the memcg ones (same context layout for what
 * they read): one copy of the policy in JIT code. dbguard.kernel.bpf fills reclaim_jump. */
BPF_PROG_ARRAY(reclaim_jump, 2);
#define DBG_JUMP_BEGIN 0
#define DBG_JUMP_END   1

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin)
{
    return dbg_reclaim_begin(args);
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    return dbg_reclaim_end(args->nr_reclaimed);
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_begin)
{
    reclaim_jump.call(args, DBG_JUMP_BEGIN);
    return 0;
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_end)
{
    reclaim_jump.call(args, DBG_JUMP_END);
    return 0;
}
