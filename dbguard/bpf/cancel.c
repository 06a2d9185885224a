/* The in-kernel cancel: a PostgreSQL client backend whose own reclaim keeps failing (or, from
 * cancel_level on, that reclaims at all) gets SIGINT in its own context, PostgreSQL's own
 * cancel (what pg_cancel_backend sends): its statement ends with "canceling statement due to
 * user request" and gives its memory back, the session and the server stay.
 *
 * Only entries the sidecar wrote with DBG_CANCEL qualify: it sets the flag from
 * pg_stat_activity's backend_type 'client backend' alone, on an entry that carries the
 * process's start time, and the kernel never copies it to a child. SIGINT means a fast
 * shutdown to the postmaster and something else to auxiliary processes and walsenders, so
 * nothing but that flag leads here. Only a backend holding at least `min_anon_pages`
 * (kill.min_rss), at most once per backend per streak (the streak's `reported`), at most one
 * cancel per `cancel_gap_ns` across backends; dry run: the event only. Called from reclaim.c,
 * which counts the streaks (dbg_cancel_short says which passes count for a backend) and, when
 * no cancel was sent (dbg_cancel_gate returned 0), goes on to its kill gate. */
#include "dbguard.h"

BPF_ARRAY(last_cancel, u64, 1);     /* when the last in-kernel cancel was sent */

/* The current task's entry if it is a client backend the sidecar flagged for cancel. */
static __always_inline struct dbg_proc *dbg_cancellable(u32 tgid, u64 task)
{
    struct dbg_proc *p = dbg_entry(tgid, task);
    return p && (p->flags & DBG_CANCEL) && p->start ? p : 0;
}

/* Whether a reclaim pass that freed more than fail_pages failed anyway for this task: a
 * client backend flagged for cancel, and at most cancel_pages freed or its scope at
 * cancel_level. A pending SIGINT is handled only once the allocation in flight got its
 * memory, and a cgroup that reached its limit with little besides anonymous memory has that
 * memory for a few passes more: the cancel comes at the limit, not once reclaim is dry.
 * They count in the streak the kill gate reads too: a backend whose cancel is held back
 * (cancel_gap_ns) has a victim killed for it after fail_streak of them at min_level_to_kill. */
static __always_inline int dbg_cancel_short(struct dbg_policy *pol, u32 tgid, unsigned long nr_reclaimed)
{
    struct dbg_proc *p = procs.lookup(&tgid);
    if (!p || !(p->flags & DBG_CANCEL))
        return 0;
    if (nr_reclaimed <= pol->cancel_pages)
        return 1;
    if (!pol->cancel_level)
        return 0;
    u64 task = bpf_get_current_task();
    u32 level = pol->level;
    dbg_scope_of(pol, task, &level);
    return level >= pol->cancel_level && dbg_anon_pages(task) >= (s64)pol->min_anon_pages;
}

/* Whether the gap since the last cancel allows one now; claims it if so (one CPU wins). */
static __always_inline int dbg_cancel_slot(struct dbg_policy *pol, u64 now)
{
    int zero = 0;
    u64 *last = last_cancel.lookup(&zero);
    if (!last)
        return 0;
    u64 seen = *last;
    if (seen && now - seen < pol->cancel_gap_ns)
        return 0;
    return __sync_val_compare_and_swap(last, seen, now) == seen;
}

static __always_inline int dbg_cancel_gate(void *ctx, struct dbg_policy *pol, u32 tgid, u64 task,
                                           struct dbg_streak *s)
{
    if (!pol->cancel_streak || s->fails < pol->cancel_streak)
        return 0;
    struct dbg_proc *p = dbg_cancellable(tgid, task);
    if (!p || dbg_untouchable(pol, task, tgid))
        return 0;
    u32 level = pol->level;
    dbg_scope_of(pol, task, &level);
    /* A small backend that happens to allocate when reclaim fails is not the one to end. */
    s64 pages = dbg_anon_pages(task);
    if (pages < (s64)pol->min_anon_pages)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (!dbg_cancel_slot(pol, now)) {
        dbg_count(DBG_CTR_CANCELS_LIMITED);
        return 0;
    }
    s->reported = 1;
    u64 id = bpf_get_current_pid_tgid();
    struct dbg_event ev = {};
    ev.pid = (u32)id;
    ev.tgid = tgid;
    ev.level = level;
    ev.flags = p->flags | (pol->cancel_level && level >= pol->cancel_level ? DBG_EVF_AT_LIMIT : 0);
    ev.tier = p->tier;
    ev.a = s->fails;
    ev.b = now - s->first_ns;
    ev.by_pid = (u32)id;
    ev.start = p->start;
    ev.pages = pages;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (pol->dry_run) {
        ev.kind = DBG_EV_WOULD_CANCEL;
        dbg_count(DBG_CTR_WOULD_CANCELS);
    } else {
        ev.c = bpf_send_signal(2);
        ev.kind = DBG_EV_CANCEL;
        dbg_count(ev.c ? DBG_CTR_CANCEL_ERRORS : DBG_CTR_CANCELS);
    }
    dbg_emit(ctx, &ev);
    return 1;
}
