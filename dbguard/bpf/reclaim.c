/* The in-kernel kill: the allocating task is killed in its own context when its reclaim
 * keeps failing, whether or not the sidecar has seen it yet.
 *
 * Reclaim alone is normal (a cgroup full of page cache reclaims all day), so the gate is the
 * kernel's own verdict: a streak of reclaims that each freed at most `fail_pages` pages,
 * counted per process from the ..._reclaim_end events and ended by one that freed a full batch
 * (a pass that freed only a few pages neither counts nor ends it, as in the kernel's charge). The streak it takes is the
 * sidecar's to tune by level (`fail_streak` from `min_level_to_kill` on, `early_streak`
 * below; the kernel's own OOM killer waits for 16 failed reclaims of one charge), but no
 * kill waits for the sidecar: a task of the watched scope that it has not listed yet
 * (seconds-old hogs) is killed on the streak alone when it holds at least `min_anon_pages`.
 * Never killed: shielded processes (and their children, from birth), children of shielded
 * processes not judged yet, tasks running a database server's executable, kernel threads,
 * PID 1, dbguard.
 *
 * A task that may not be killed is often the one whose charge fails: a database backend
 * touching its shared buffers while hogs fill the cgroup. Left alone it would go on to the
 * kernel's OOM killer, which picks the live task of the largest badness. So streaks are counted
 * for every task of the scope, and when such a task's streak reaches the gate, a victim is
 * killed instead: of the killable tasks exec'd in the scope or whose own reclaim failed there
 * (`victims`, offered then) and the candidates the sidecar would kill next (listed in `victims`
 * at each sync), the live one holding the most anonymous memory now. A task already killed or
 * exiting is neither a victim nor a reason to kill: it gives its memory back by itself (and the
 * kernel's OOM killer, should it run, reaps such a task rather than kill another). That kill
 * needs bpf_send_signal_task (Linux 6.13); BPF can otherwise signal only the current task. */
#include "dbguard.h"

/* The streak the gate asks for at `level` (the stuck task's own scope's); 0: no kill. */
static __always_inline u32 dbg_needed(struct dbg_policy *pol, u32 level)
{
    return level >= pol->min_level_to_kill ? pol->fail_streak : pol->early_streak;
}

/* The shortest streak any level asks for: below it no scope needs to be looked up. */
static __always_inline u32 dbg_least_needed(struct dbg_policy *pol)
{
    u32 early = pol->early_streak;
    return early && early < pol->fail_streak ? early : pol->fail_streak;
}

/* Fills a kill event (the streak that led to it, who was allocating) and counts it; returns
 * whether a signal is to be sent (not in a dry run). */
static __always_inline int dbg_kill_event(struct dbg_policy *pol, u32 level, struct dbg_event *ev,
                                          u32 evflags, struct dbg_streak *s)
{
    ev->level = level;
    ev->flags = evflags;
    ev->a = s->fails;
    ev->b = bpf_ktime_get_ns() - s->first_ns;
    ev->by_pid = (u32)bpf_get_current_pid_tgid();
    if (evflags & DBG_EVF_UNLISTED)
        dbg_count(DBG_CTR_UNLISTED_KILLS);
    if (evflags & DBG_EVF_FOR_OTHER)
        dbg_count(DBG_CTR_KILLS_FOR_OTHER);
    if (pol->dry_run) {
        ev->kind = DBG_EV_WOULD_KILL;
        dbg_count(DBG_CTR_WOULD_KILLS);
        return 0;
    }
    ev->kind = DBG_EV_KILL;
    return 1;
}

static __always_inline void dbg_kill(void *ctx, struct dbg_policy *pol, u32 level, u32 tier, u32 evflags,
                                     struct dbg_streak *s)
{
    u64 id = bpf_get_current_pid_tgid();
    struct dbg_event ev = {};
    ev.pid = (u32)id;
    ev.tgid = id >> 32;
    ev.tier = tier;
    ev.start = dbg_start_ticks(bpf_get_current_task());
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (dbg_kill_event(pol, level, &ev, evflags, s)) {
        ev.c = bpf_send_signal(9);
        dbg_count(ev.c ? DBG_CTR_KILL_ERRORS : DBG_CTR_KILLS);
    }
    dbg_forget_victim(ev.tgid);
    dbg_emit(ctx, &ev);
}

/* The current task, whose reclaim keeps failing, may not be killed: a victim of its own scope
 * (`scope`, its key) is. Another scope's tasks are another pod's, under their own limit: killing
 * one frees nothing here. Each slot's process is looked up by pid and must still be the one
 * offered (start time), alive, not shielded since, not running a database executable, and
 * unlisted ones hold min_anon_pages; the largest by anonymous memory now wins, and it must
 * still lie in the scope (it may have been moved since it was offered). */
static __always_inline void dbg_kill_victim(void *ctx, struct dbg_policy *pol, u32 level, u64 scope,
                                            struct dbg_streak *s)
{
#ifdef DBG_HAVE_SIGNAL_TASK
    u32 best_tgid = 0;
    u64 best_start = 0;
    s64 best_anon = -1;
    int best = -1;
    if (!scope) {           /* no watched scope holds it: no pod to take a victim from */
        dbg_count(DBG_CTR_NO_VICTIM);
        return;
    }
#pragma unroll
    for (int i = 0; i < DBG_VICTIM_SLOTS + DBG_LISTED_VICTIMS; i++) {
        int k = i;
        struct dbg_victim *v = victims.lookup(&k);
        if (!v || !v->tgid || v->scope != scope)
            continue;
        u32 tgid = v->tgid;
        struct dbg_proc *p = procs.lookup(&tgid);
        void *task = dbg_task_from_pid(tgid);
        if (!task) {
            v->tgid = 0;
            continue;
        }
        u64 t = (u64)task;
        if (dbg_start_ticks(t) != v->start || (p && (p->flags & DBG_SHIELD)) || dbg_db_exe(t)) {
            v->tgid = 0;
        } else if (!dbg_dying(t)) {
            s64 anon = dbg_anon_pages(t);
            int big_enough = !(v->flags & DBG_EVF_UNLISTED) || anon >= (s64)pol->min_anon_pages;
            if (big_enough && anon > best_anon) {
                best_anon = anon;
                best_tgid = tgid;
                best_start = v->start;
                best = i;
            }
        }
        dbg_task_release(task);
    }
    if (best < 0) {
        dbg_count(DBG_CTR_NO_VICTIM);
        return;
    }
    struct dbg_victim *v = victims.lookup(&best);
    if (!v)
        return;
    struct dbg_event ev = {};
    ev.pid = best_tgid;
    ev.tgid = best_tgid;
    ev.tier = v->tier;
    ev.start = best_start;
    u32 evflags = v->flags | DBG_EVF_FOR_OTHER;
    __builtin_memcpy(ev.comm, v->comm, sizeof(ev.comm));
    v->tgid = 0;
    void *task = dbg_task_from_pid(best_tgid);
    if (!task) {
        dbg_count(DBG_CTR_NO_VICTIM);
        return;
    }
    u32 its_level = level;
    if (dbg_start_ticks((u64)task) != best_start || dbg_scope_of(pol, (u64)task, &its_level) != scope) {
        dbg_task_release(task);
        dbg_count(DBG_CTR_NO_VICTIM);
        return;
    }
    bpf_get_current_comm(&ev.by_comm, sizeof(ev.by_comm));
    if (dbg_kill_event(pol, level, &ev, evflags, s)) {
        ev.c = dbg_send_signal_task(task, 9, DBG_PIDTYPE_TGID, 0);
        dbg_count(ev.c ? DBG_CTR_KILL_ERRORS : DBG_CTR_KILLS);
    }
    dbg_task_release(task);
    dbg_emit(ctx, &ev);
#else
    dbg_count(DBG_CTR_NO_VICTIM);
#endif
}

/* Who the current task is to the kill path: 0 left alone, else the event flags of a kill,
 * with its tier in *tier. Listed candidates first, then cgroup policies (v2 ids), then the
 * watched scope. */
static __always_inline u32 dbg_judge(struct dbg_policy *pol, u64 task, u32 tgid, u32 *tier)
{
    struct dbg_proc *p = dbg_entry(tgid, task);
    if (p && (p->flags & DBG_SHIELD))
        return 0;
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

/* Whether the current task may be killed at all (its kill event flags, else 0): dbg_judge, and
 * never PID 1, dbguard, a kernel thread or a database server's executable. */
static __always_inline u32 dbg_killable(struct dbg_policy *pol, u64 task, u32 tgid, u32 *tier)
{
    u32 evflags = dbg_judge(pol, task, tgid, tier);
    if (!evflags || dbg_untouchable(pol, task, tgid))
        return 0;
    if (dbg_db_exe(task)) {
        dbg_count(DBG_CTR_EXE_PROTECTED);
        return 0;
    }
    return evflags;
}

/* The kill gate: killable, and an unlisted task only when it holds min_anon_pages (`anon`). */
static __always_inline u32 dbg_kill_gate(struct dbg_policy *pol, u64 task, u32 tgid, s64 anon, u32 *tier)
{
    u32 evflags = dbg_killable(pol, task, tgid, tier);
    if ((evflags & DBG_EVF_UNLISTED) && anon < (s64)pol->min_anon_pages)
        return 0;
    return evflags;
}

/* The current task, born in the scope or failing to reclaim there, is offered as a victim: it
 * takes its own slot again, a free one, or, all taken, the one holding the least if it holds
 * more; only if it may be killed at all (its size is judged at the kill). */
static __always_inline void dbg_offer_victim(struct dbg_policy *pol, u64 task, u32 tgid, u64 now)
{
    if (dbg_dying(task))
        return;
    s64 anon = dbg_anon_pages(task);
    int pick = -1;
    s64 weakest = anon;
#pragma unroll
    for (int i = 0; i < DBG_VICTIM_SLOTS; i++) {
        int k = i;
        struct dbg_victim *v = victims.lookup(&k);
        if (!v)
            continue;
        if (v->tgid == tgid) {
            v->anon_pages = anon;
            v->seen_ns = now;
            return;
        }
        s64 held = v->tgid ? (s64)v->anon_pages : -1;
        if (held < weakest) {
            weakest = held;
            pick = i;
        }
    }
    if (pick < 0)
        return;
    u32 tier = 0;
    u32 evflags = dbg_killable(pol, task, tgid, &tier);
    struct dbg_victim *v = victims.lookup(&pick);
    if (!evflags || !v)
        return;
    v->tgid = tgid;
    v->flags = evflags;
    v->tier = tier;
    v->start = dbg_start_ticks(task);
    v->anon_pages = anon;
    v->seen_ns = now;
    u32 level = 0;
    v->scope = dbg_scope_of(pol, task, &level);
    bpf_get_current_comm(&v->comm, sizeof(v->comm));
}

/* A streak ends (batch reclaimed, victim killed, answered then quiet); next failure stamps the next. */
static __always_inline void dbg_streak_end(struct dbg_streak *s)
{
    s->fails = 0;
    s->reported = 0;
}

/* At the streak the gate asks for: the current task is killed, or when it may not be, the
 * victim; either way once per streak (a victim's kill starts the stuck task's streak over,
 * so that a second victim goes only if the first one's memory did not help). */
static __always_inline int dbg_reclaim_begin(void *ctx)
{
    /* Reclaim evicts caches: the common case (no streak going) is three lookups. */
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct dbg_proc *p = procs.lookup(&tgid);
    if (p && (p->flags & DBG_SHIELD))
        dbg_count(DBG_CTR_RECLAIM_PROTECTED);
    struct dbg_policy *pol = dbg_policy();
    if (!pol || !pol->enabled)
        return 0;
    struct dbg_streak *s = streaks.lookup(&tgid);
    if (s && !s->reported && p && (p->flags & DBG_CANCEL) &&    /* a client backend: cancel.c */
        dbg_cancel_gate(ctx, pol, tgid, bpf_get_current_task(), s))
        return 0;
    if (!s || s->reported || s->fails < dbg_least_needed(pol))
        return 0;
    u64 task = bpf_get_current_task();
    if (dbg_dying(task))
        return 0;
    /* The gate is the task's own scope's: pressure in one pod does not shorten another's. */
    u32 level = pol->level;
    u64 scope = dbg_scope_of(pol, task, &level);
    u32 needed = dbg_needed(pol, level);
    if (!needed || s->fails < needed)
        return 0;
    u32 tier = 0;
    u32 evflags = dbg_kill_gate(pol, task, tgid, dbg_anon_pages(task), &tier);
    if (evflags) {
        s->reported = 1;
        dbg_kill(ctx, pol, level, tier, evflags, s);
        return 0;
    }
    dbg_kill_victim(ctx, pol, level, scope, s);
    dbg_streak_end(s);      /* reported is 0 here: a reported streak returned above */
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

/* Streaks are counted for every task a kill could reach (listed candidates, cgroup-policy
 * tasks) and every task of the watched scope, shielded or not: dbg_reclaim_begin decides
 * whom a streak kills. Client backends flagged for cancel have streaks too: cancel.c. */
static __always_inline int dbg_reclaim_end(void *ctx, unsigned long nr_reclaimed)
{
    struct dbg_policy *pol = dbg_policy();
    if (!pol || !pol->enabled)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct dbg_streak *s = streaks.lookup(&tgid);
    if (nr_reclaimed > pol->fail_pages && !dbg_cancel_short(pol, tgid, nr_reclaimed)) {
        /* Progress. A full batch ends the streak; a few pages do not: the kernel's charge retries
         * on them without counting them, and still goes to its OOM killer after 16 failures. */
        if (s && s->fails && nr_reclaimed >= DBG_RECLAIM_BATCH)
            dbg_streak_end(s);
        return 0;
    }
    u64 task = bpf_get_current_task();
    u64 now = bpf_ktime_get_ns();
    if (s) {
        /* Answered, then no failure for DBG_STREAK_QUIET_NS (one charge's retries come close
         * together): over. A cancelled backend frees its memory without reclaiming; its next
         * statement's failures, with nothing left to reclaim, are a new streak with its own cancel. */
        if (s->reported && now - s->last_ns > DBG_STREAK_QUIET_NS)
            dbg_streak_end(s);
        if (!s->fails)
            s->first_ns = now;          /* a streak's first failure: what its events time from */
        s->last_ns = now;
        __sync_fetch_and_add(&s->fails, 1);
        dbg_count(DBG_CTR_RECLAIM_FAILED);
        dbg_offer_victim(pol, task, tgid, now);
        return 0;
    }
    u32 tier = 0;
    if (!dbg_cancellable(tgid, task) && !dbg_judge(pol, task, tgid, &tier) && !dbg_in_scope(pol, task))
        return 0;
    struct dbg_streak fresh = {.first_ns = now, .last_ns = now, .fails = 1};
    streaks.update(&tgid, &fresh);
    dbg_count(DBG_CTR_RECLAIM_FAILED);
    dbg_offer_victim(pol, task, tgid, now);
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
