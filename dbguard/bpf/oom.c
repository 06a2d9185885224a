/* Audit of the kernel's own OOM decisions and of tampering with protected scores. */
#include "dbguard.h"

TRACEPOINT_PROBE(oom, mark_victim)
{
    u32 pid = args->pid;
    struct dbg_event ev = {};
    ev.pid = pid;
    ev.tgid = pid;     /* the OOM killer picks a process; its tid is the tgid unless the leader had exited */
    struct dbg_policy *pol = dbg_policy();
    struct dbg_proc *p = procs.lookup(&pid);
    if (p) {
        ev.flags = p->flags;
        ev.tier = p->tier;
        if (p->flags & DBG_CANDIDATE)
            ev.flags |= DBG_EVF_CANDIDATE;
    }
    struct dbg_streak *s = streaks.lookup(&pid);
    if (s && s->reported && !(p && (p->flags & DBG_SHIELD)) && pol && !pol->dry_run)
        ev.flags |= DBG_EVF_KILLED;
    if (p && (p->flags & DBG_SHIELD)) {
        ev.kind = DBG_EV_BREACH;
        dbg_count(DBG_CTR_BREACHES);
    } else {
        ev.kind = DBG_EV_OOM_VICTIM;
        dbg_count(DBG_CTR_OOM_VICTIMS);
    }
    if (pol)
        ev.level = pol->level;
    TP_DATA_LOC_READ_STR(ev.comm, comm, sizeof(ev.comm));
#ifdef DBG_HAVE_VICTIM_RSS
    ev.a = args->anon_rss;
    ev.b = args->file_rss + args->shmem_rss;
    ev.c = args->oom_score_adj;
#endif
    ev.by_pid = bpf_get_current_pid_tgid();
    bpf_get_current_comm(&ev.by_comm, sizeof(ev.by_comm));
    dbg_emit(args, &ev);
    return 0;
}

/* A raised score on a protected process is a lowered shield. dbguard's own writes
 * (restores) only update the last seen value. */
TRACEPOINT_PROBE(oom, oom_score_adj_update)
{
    u32 pid = args->pid;
    struct dbg_proc *p = procs.lookup(&pid);
    if (!p || !(p->flags & DBG_SHIELD))
        return 0;
    s32 old = p->score, now = args->oom_score_adj;
    p->score = now;
    u64 id = bpf_get_current_pid_tgid();
    struct dbg_policy *pol = dbg_policy();
    if (!pol || (u32)(id >> 32) == pol->self_tgid)
        return 0;
    if (old != DBG_SCORE_UNKNOWN && now <= old)
        return 0;
    struct dbg_event ev = {};
    ev.kind = DBG_EV_SCORE_TAMPER;
    ev.pid = pid;
    ev.tgid = pid;
    ev.level = pol->level;
    ev.flags = p->flags;
    ev.tier = p->tier;
    ev.a = (u64)(old + 2000);
    ev.b = p->start;       /* the process the sidecar shielded: a restore goes only to it */
    ev.c = now;
    ev.by_pid = (u32)id;
    __builtin_memcpy(ev.comm, args->comm, sizeof(ev.comm));
    bpf_get_current_comm(&ev.by_comm, sizeof(ev.by_comm));
    dbg_count(DBG_CTR_SCORE_TAMPERS);
    dbg_emit(args, &ev);
    return 0;
}
