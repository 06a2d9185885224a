/* Kill the allocating kill candidate when reclaim keeps failing and the sidecar's level allows.
 *
 * Reclaim alone is normal (a cgroup full of page cache reclaims all day), so a kill needs
 * both the sidecar's level and the kernel's own verdict: `fail_streak` reclaims in a row
 * that freed at most `fail_pages` pages, counted per tgid from the ..._reclaim_end events.
 * BPF can signal only the current task, which here is the one allocating. */
#include "dbguard.h"

static __always_inline int dbg_reclaim_begin(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct dbg_policy *pol = dbg_policy();
    if (!pol)
        return 0;
    struct dbg_proc *prot = protected.lookup(&tgid);
    if (prot && (prot->flags & DBG_SHIELD)) {
        dbg_count(DBG_CTR_RECLAIM_PROTECTED);
        return 0;
    }
    if (!pol->enabled || pol->level < pol->min_level_to_kill)
        return 0;
    struct dbg_streak *st = streaks.lookup(&tgid);
    if (!st || st->fails < pol->fail_streak || st->reported)
        return 0;

    struct dbg_cgroup *cp = 0;
    if (pol->n_cgroups) {
        u64 cg = bpf_get_current_cgroup_id();
        cp = cgroups.lookup(&cg);
        if (cp && cp->action == DBG_ACTION_SHIELD) {
            dbg_count(DBG_CTR_RECLAIM_PROTECTED);
            return 0;
        }
    }
    u32 tier, evflags;
    struct dbg_candidate *cand = candidates.lookup(&tgid);
    if (cand) {
        tier = cand->tier;
        evflags = DBG_EVF_CANDIDATE;
    } else if (cp && cp->action == DBG_ACTION_KILL) {
        tier = cp->tier;
        evflags = DBG_EVF_CANDIDATE | DBG_EVF_BY_CGROUP;
    } else {
        return 0;
    }

    st->reported = 1;
    struct dbg_event ev = {};
    ev.pid = (u32)id;
    ev.tgid = tgid;
    ev.level = pol->level;
    ev.flags = evflags;
    ev.tier = tier;
    ev.a = st->fails;
    ev.b = st->last_fail_ns;
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
    return 0;
}

static __always_inline int dbg_reclaim_end(unsigned long nr_reclaimed)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct dbg_policy *pol = dbg_policy();
    if (!pol)
        return 0;
    if (nr_reclaimed > pol->fail_pages) {
        streaks.delete(&tgid);
        return 0;
    }
    dbg_count(DBG_CTR_RECLAIM_FAILED);
    u64 now = bpf_ktime_get_ns();
    struct dbg_streak *st = streaks.lookup(&tgid);
    if (st) {
        __sync_fetch_and_add(&st->fails, 1);
        st->last_fail_ns = now;
    } else {
        struct dbg_streak fresh = { .fails = 1, .last_fail_ns = now };
        streaks.update(&tgid, &fresh);
    }
    return 0;
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin)
{
    dbg_count(DBG_CTR_RECLAIM_BEGIN);
    return dbg_reclaim_begin(args);
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_begin)
{
    dbg_count(DBG_CTR_RECLAIM_BEGIN);
    return dbg_reclaim_begin(args);
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
    return dbg_reclaim_end(args->nr_reclaimed);
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_end)
{
    return dbg_reclaim_end(args->nr_reclaimed);
}
