/* dbguard BPF: constants and the structs shared by every program and by user space.
 *
 * Mirrored once in Python: dbguard/kernel/layout.py (its constants are parsed from this
 * file; its ctypes structs are checked against BCC's own view in tests/e2e/test_bpf.py).
 * Only fixed-width fields, no kernel struct layouts, so the layout is the same on every
 * kernel and stays usable by a future bpf_oom_ops victim selector.
 */
#ifndef DBGUARD_H
#define DBGUARD_H

/* procs[tgid].flags */
#define DBG_SHIELD     0x1   /* never killed by dbguard; a kernel OOM kill of it is a breach */
#define DBG_INHERIT    0x2   /* children (new processes, not threads) are protected at birth */
#define DBG_INHERITED  0x4   /* entry made by the kernel at fork; removed at exit, not by a sync */
#define DBG_CANDIDATE  0x8   /* may be killed in kernel; SHIELD wins when both are set */
/* extra bits only in dbg_event.flags */
#define DBG_EVF_CANDIDATE 0x100  /* the process was a kill candidate */
#define DBG_EVF_BY_CGROUP 0x200  /* matched through the per-cgroup policy */
#define DBG_EVF_KILLED    0x400  /* dbguard's program had already killed it (oom: the kernel reaps a dying task) */

/* cgroups[id].action */
#define DBG_ACTION_NONE   0
#define DBG_ACTION_KILL   1   /* tasks of this cgroup are kill candidates */
#define DBG_ACTION_SHIELD 2   /* tasks of this cgroup count as protected */

/* dbg_event.kind */
#define DBG_EV_KILL          1
#define DBG_EV_WOULD_KILL    2
#define DBG_EV_OOM_VICTIM    3
#define DBG_EV_BREACH        4
#define DBG_EV_SCORE_TAMPER  5

/* counters[] index */
#define DBG_CTR_FORK_INHERITED     0
#define DBG_CTR_MAP_FULL           1
#define DBG_CTR_EXIT_REMOVED       2
#define DBG_CTR_RECLAIM_PROTECTED  3
#define DBG_CTR_RECLAIM_FAILED     4   /* failed reclaims of kill candidates (and kill cgroups) */
#define DBG_CTR_KILLS              5
#define DBG_CTR_WOULD_KILLS        6
#define DBG_CTR_KILL_ERRORS        7
#define DBG_CTR_OOM_VICTIMS        8
#define DBG_CTR_BREACHES           9
#define DBG_CTR_SCORE_TAMPERS      10
#define DBG_CTR_EVENTS_DROPPED     11
#define DBG_NR_COUNTERS            12

#define DBG_SCORE_UNKNOWN (-1001)   /* dbg_proc.score before any value was seen */

/* procs[tgid]: protected processes and kill candidates in one map, so every hook needs
 * one lookup and an exit one delete. The failed-reclaim streak lives here too: only a
 * candidate can be killed, so only a candidate's streak is worth counting. */
struct dbg_proc {
    u32 flags;
    u32 tier;              /* protection tier */
    u32 cand_tier;         /* candidate tier (kill order), with DBG_CANDIDATE */
    u32 origin;            /* the tgid the sidecar protected (itself, or the inherited-from ancestor) */
    s32 score;             /* last oom_score_adj seen, to tell a lowered shield from a restore */
    u32 fails;             /* consecutive failed reclaims (kernel-owned) */
    u32 reported;          /* an event was sent for this streak (kernel-owned) */
    u32 pad;
};

/* cgroups[cgroup v2 id]: per-cgroup policy with its own streak (multi-tenant v2 hosts). */
struct dbg_cgroup {
    u32 tier;
    u32 action;
    u32 fails;
    u32 reported;
};

struct dbg_policy {        /* policy[0], written by the sidecar every cycle it changes */
    u32 level;
    u32 enabled;
    u32 dry_run;
    u32 min_level_to_kill;
    u32 fail_streak;       /* consecutive failed reclaims before a kill is allowed */
    u32 fail_pages;        /* a reclaim that freed at most this many pages failed */
    u32 self_tgid;         /* dbguard itself: its score writes are restores, not tampering */
    u32 n_cgroups;         /* entries in cgroups: 0 skips that lookup */
};

struct dbg_event {
    u64 ts_ns;             /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    u64 cgroup_id;         /* cgroup v2 id of the current task */
    u64 a;                 /* kill: failed-reclaim streak;  oom: anon_rss pages;  tamper: old score + 2000 */
    u64 b;                 /* oom: file+shmem rss pages */
    u32 kind;
    u32 pid;
    u32 tgid;
    u32 level;
    u32 flags;
    u32 tier;
    u32 by_pid;            /* the current task: the allocator (oom) or the writer (tamper) */
    s32 c;                 /* kill: bpf_send_signal result; oom: victim oom_score_adj; tamper: new score */
    char comm[16];
    char by_comm[16];
};

#endif
