/* The in-kernel kill: the allocating task is killed in its own context when its reclaim
 * keeps failing, whether or not the sidecar has seen it yet.
 *
 * Reclaim alone is normal (a cgroup full of page cache reclaims all day), so the gate is the
 * kernel's own verdict: a streak of reclaims in a row that each freed at most `fail_pages`
 * pages, counted per process from the ..._reclaim_end events. The streak it takes is the
 * sidecar's to tune by level (`fail_streak` from `min_level_to_kill` on, `early_streak`
 * below; the kernel's own OOM killer waits for 16 failed reclaims of one charge), but no
 * kill waits for the sidecar: a task of the watched scope that it has not listed yet
 * (seconds-old hogs) is killed on the streak alone when it holds at least `min_anon_pages`.
 * Never killed: shielded processes (and their children, from birth), children of shielded
 * processes not judged yet, tasks running a database server's executable, kernel threads,
 * PID 1, dbguard. BPF can signal only the current task, which here is the one allocating. */
#include "dbguard.h"

static __always_inline u32 dbg_needed(struct dbg_policy *pol)
{
    return pol->level >= pol->min_level_to_kill ? pol->fail_streak : pol->early_streak;
}

static __always_inline void dbg_kill(void *ctx, struct dbg_policy *pol, u32 tier, u32 evflags,
                                     struct dbg_streak *s)
{
    u64 id = bpf_get_current_pid_tgid();
    struct dbg_event ev = {};
    ev.pid = (u32)id;
    ev.tgid = id >> 32;
    ev.level = pol->level;
    ev.flags = evflags;
    ev.tier = tier;
    ev.a = s->fails;
    ev.b = bpf_ktime_get_ns() - s->first_ns;
    ev.by_pid = (u32)id;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (evflags & DBG_EVF_UNLISTED)
        dbg_count(DBG_CTR_UNLISTED_KILLS);
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

/* Who the current task is to the kill path: 0 left alone, else the event flags of a kill,
 * with its tier in *tier. Listed candidates first, then cgroup policies (v2 ids), then the
 * watched scope. */
static __always_inline u32 dbg_judge(struct dbg_policy *pol, u64 task, u32 tgid, u32 *tier)
{
    struct dbg_proc *p = dbg_entry(tgid, task);
    if (p && (p->flags & DBG_SHIELD)) {
        dbg_count(DBG_CTR_RECLAIM_PROTECTED);
        return 0;
    }
    if (p && (p->flags & DBG_CANDIDATE)) {
        *tier = p->cand_tier;
        return DBG_EVF_CANDIDATE;
    }
    if (pol->n_cgroups) {
        u64 cg = bpf_get_current_cgroup_id();
        struct dbg_cgroup *c = cgroups.lookup(&cg);
        if (c && c->action == DBG_ACTION_SHIELD) {
            dbg_count(DBG_CTR_RECLAIM_PROTECTED);
            return 0;
        }
        if (c && c->action == DBG_ACTION_KILL) {
            *tier = c->tier;
            return DBG_EVF_CANDIDATE | DBG_EVF_BY_CGROUP;
        }
    }
    if (p || !dbg_in_scope(pol, task))     /* an entry that is neither: a fresh child, not judged */
        return 0;
    *tier = 0;
    return DBG_EVF_UNLISTED;
}

static __always_inline int dbg_reclaim_begin(void *ctx)
{
    /* Reclaim evicts caches: the common cases (a shielded task, no streak going) are two
     * lookups. The start time of a shielded entry is checked only if it comes to a kill. */
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct dbg_proc *p = procs.lookup(&tgid);
    if (p && (p->flags & DBG_SHIELD) && !p->start) {
        dbg_count(DBG_CTR_RECLAIM_PROTECTED);
        return 0;
    }
    struct dbg_policy *pol = dbg_policy();
    if (!pol || !pol->enabled)
        return 0;
    struct dbg_streak *s = streaks.lookup(&tgid);
    if (s && !s->reported && p && (p->flags & DBG_CANCEL))    /* a client backend: cancel.c */
        return dbg_cancel_gate(ctx, pol, tgid, bpf_get_current_task(), s);
    u32 needed = dbg_needed(pol);
    if (!s || s->reported || !needed || s->fails < needed)
        return 0;
    u64 task = bpf_get_current_task();
    u32 tier = 0;
    u32 evflags = dbg_judge(pol, task, tgid, &tier);
    if (!evflags || dbg_untouchable(pol, task, tgid))
        return 0;
    if (dbg_db_exe(task)) {
        dbg_count(DBG_CTR_EXE_PROTECTED);
        return 0;
    }
    if ((evflags & DBG_EVF_UNLISTED) && dbg_anon_pages(task) < (s64)pol->min_anon_pages)
        return 0;
    s->reported = 1;
    dbg_kill(ctx, pol, tier, evflags, s);
    return 0;
}

/* A streak's first failure in the scope wakes the sidecar (at most once per 10 ms): the
 * kernel's own word that memory is running out, ahead of any usage figure. */
static __always_inline void dbg_wake(void *ctx, struct dbg_policy *pol, u64 now)
{
    int zero = 0;
    u64 *last = last_wake.lookup(&zero);
    if (!last || now - *last < 10000000)
        return;
    *last = now;
    struct dbg_event ev = {};
    u64 id = bpf_get_current_pid_tgid();
    ev.kind = DBG_EV_RECLAIM_FAIL;
    ev.pid = (u32)id;
    ev.tgid = id >> 32;
    ev.level = pol->level;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    dbg_emit(ctx, &ev);
}

/* Streaks are counted for every task that is not shielded and that a kill could reach:
 * listed candidates, cgroup-policy tasks and the watched scope; dbg_judge decides at the kill.
 * Client backends flagged for cancel (shielded as they are) have streaks too: cancel.c. */
static __always_inline int dbg_reclaim_end(void *ctx, unsigned long nr_reclaimed)
{
    struct dbg_policy *pol = dbg_policy();
    if (!pol || !pol->enabled)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct dbg_streak *s = streaks.lookup(&tgid);
    if (nr_reclaimed > pol->fail_pages && !dbg_cancel_short(pol, tgid, nr_reclaimed)) {
        if (s && s->fails) {
            s->fails = 0;
            s->reported = 0;
        }
        return 0;
    }
    if (s) {
        __sync_fetch_and_add(&s->fails, 1);
        dbg_count(DBG_CTR_RECLAIM_FAILED);
        return 0;
    }
    u64 task = bpf_get_current_task();
    u32 tier = 0;
    if (!dbg_cancellable(tgid, task) && !dbg_judge(pol, task, tgid, &tier))
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct dbg_streak fresh = {.first_ns = now, .fails = 1};
    streaks.update(&tgid, &fresh);
    dbg_count(DBG_CTR_RECLAIM_FAILED);
    dbg_wake(ctx, pol, now);
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
    return dbg_reclaim_end(args, args->nr_reclaimed);
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
