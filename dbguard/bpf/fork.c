/* Protection inherited at birth, births reported, entries removed at death.
 *
 * task:task_newtask runs in the parent during clone(), before the child can run, and,
 * unlike sched:sched_process_fork, it carries clone_flags: the only tracepoint argument
 * that tells a new thread (same tgid, nothing to add) from a new process. */
#include "dbguard.h"

#define DBG_CLONE_THREAD 0x00010000

static __always_inline void dbg_birth(void *ctx, struct dbg_policy *pol, u32 pid, u32 parent, u32 flags)
{
    struct dbg_event ev = {};
    ev.kind = DBG_EV_BIRTH;
    ev.pid = pid;
    ev.tgid = pid;
    ev.level = pol->level;
    ev.flags = flags;
    ev.a = parent;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    dbg_count(DBG_CTR_BIRTHS);
    dbg_emit(ctx, &ev);
}

TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & DBG_CLONE_THREAD)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u64 task = bpf_get_current_task();
    struct dbg_proc *p = dbg_entry(parent, task);
    u32 pid = args->pid;
    struct dbg_policy *pol = dbg_policy();
    /* The child shares the parent's memory cgroup. */
    int in_scope = pol && dbg_in_scope(pol, task);
    if (!p || !(p->flags & DBG_SHIELD)) {
        if (in_scope && pol->births)    /* a birth in the scope, for the sidecar to score at once */
            dbg_birth(args, pol, pid, parent, 0);
        return 0;
    }
    /* A database family is protected for good. The child of another shielded process is
     * spared by the kernel path until the sidecar has judged it (DBG_FRESH): a birth. */
    u32 flags = p->flags & (DBG_SHIELD | DBG_INHERIT);
    if (!(p->flags & DBG_INHERIT)) {
        if (!in_scope)
            return 0;
        flags = DBG_FRESH;
        if (pol->births)
            dbg_birth(args, pol, pid, parent, 0);
    }
    struct dbg_proc child = {
        .flags = flags | DBG_INHERITED,
        .tier = p->tier,
        .origin = p->origin,
        .score = args->oom_score_adj,
    };
    if (procs.update(&pid, &child))
        dbg_count(DBG_CTR_MAP_FULL);
    else
        dbg_count(DBG_CTR_FORK_INHERITED);
    return 0;
}

/* An exec in the scope (a process moved into the cgroup before exec, as a service manager
 * or a container runtime does, is first seen here): a birth, and a victim to keep in mind. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct dbg_policy *pol = dbg_policy();
    if (!pol || !pol->births)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 task = bpf_get_current_task();
    struct dbg_proc *p = dbg_entry(tgid, task);
    if ((p && (p->flags & DBG_SHIELD)) || !dbg_in_scope(pol, task))
        return 0;
    dbg_birth(args, pol, tgid, 0, DBG_EVF_EXEC);
    dbg_offer_victim(pol, task, tgid, bpf_ktime_get_ns());
    return 0;
}

/* Fires for every exiting thread; the tgid is free for reuse only once the whole group is dead. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
#ifdef DBG_HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
#else
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != (u32)(id >> 32))
        return 0;
    u32 tgid = id >> 32;
#endif
    /* A lockless lookup first: most exits are of processes dbguard does not track, and a
     * delete takes the bucket lock even for a key that is not there. */
    if (procs.lookup(&tgid) && procs.delete(&tgid) == 0)
        dbg_count(DBG_CTR_EXIT_REMOVED);
    if (streaks.lookup(&tgid))
        streaks.delete(&tgid);
    dbg_forget_victim(tgid);
    return 0;
}
