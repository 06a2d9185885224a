/* Protection inherited at birth, removed at death.
 *
 * task:task_newtask runs in the parent during clone(), before the child can run, and,
 * unlike sched:sched_process_fork, it carries clone_flags: the only tracepoint argument
 * that tells a new thread (same tgid, nothing to add) from a new process. */
#include "dbguard.h"

#define DBG_CLONE_THREAD 0x00010000

TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & DBG_CLONE_THREAD)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    struct dbg_proc *p = procs.lookup(&parent);
    if (!p || !(p->flags & DBG_INHERIT))
        return 0;
    struct dbg_proc child = {
        .flags = (p->flags & (DBG_SHIELD | DBG_INHERIT)) | DBG_INHERITED,
        .tier = p->tier,
        .origin = p->origin,
        .score = args->oom_score_adj,
    };
    u32 pid = args->pid;
    if (procs.update(&pid, &child))
        dbg_count(DBG_CTR_MAP_FULL);
    else
        dbg_count(DBG_CTR_FORK_INHERITED);
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
    return 0;
}
