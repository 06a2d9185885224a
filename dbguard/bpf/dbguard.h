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
#define DBG_FRESH      0x10  /* born of a shielded parent, not judged by the sidecar yet: the kernel
                              * kills it only once the sidecar lists it as a candidate */
#define DBG_CANCEL     0x20  /* a PostgreSQL client backend (set by the sidecar only, never inherited):
                              * at a failing-reclaim streak its statement is cancelled (SIGINT) */
/* extra bits only in dbg_event.flags */
#define DBG_EVF_CANDIDATE 0x100  /* the process was a kill candidate */
#define DBG_EVF_BY_CGROUP 0x200  /* matched through the per-cgroup policy */
#define DBG_EVF_KILLED    0x400  /* dbguard's program had already killed it (oom: the kernel reaps a dying task) */
#define DBG_EVF_UNLISTED  0x800  /* kill: not listed by the sidecar; a task of the watched scope */
#define DBG_EVF_EXEC      0x1000 /* birth: an exec (else a fork) */
#define DBG_EVF_FOR_OTHER 0x2000 /* kill: sent from another task's failing reclaim (by_pid), a task
                                  * that may not be killed itself (see reclaim.c) */
#define DBG_EVF_AT_LIMIT  0x4000 /* cancel: its scope at cancel_level, where every reclaim pass counts */

/* dbg_policy.scope: which unlisted tasks the kernel may kill on its own */
#define DBG_SCOPE_NONE    0   /* only the candidates the sidecar listed */
#define DBG_SCOPE_CGROUP  1   /* tasks whose memory cgroup is scope_id or below it */
#define DBG_SCOPE_ALL     2   /* every task (the sidecar watches the host) */
#define DBG_SCOPE_SET     3   /* tasks whose memory cgroup is one in the scopes map or below one
                               * (several databases on one node, each with its own limit) */
#define DBG_MAX_SCOPES    64  /* entries of the scopes map */
#define DBG_SCOPE_DEPTH   16  /* scopes of the set lie at depths 1 .. DBG_SCOPE_DEPTH - 1 */
#define DBG_SCOPE_HOST    0xffffffffffffffffULL  /* the scope key of a host-wide scope (no memcg id is) */

#define DBG_PF_KTHREAD    0x00200000   /* task_struct.flags: a kernel thread */
#define DBG_PF_EXITING    0x00000004   /* task_struct.flags: exiting */
#define DBG_SIGKILL_BIT   (1UL << 8)   /* SIGKILL (9) in task_struct.pending.signal.sig[0] */
#define DBG_NSEC_PER_TICK 10000000     /* /proc/PID/stat start times are in USER_HZ (100) ticks */
#define DBG_STREAK_QUIET_NS 250000000ULL /* a streak answered, then this quiet: over (reclaim.c) */
#define DBG_RECLAIM_BATCH 32           /* SWAP_CLUSTER_MAX: what one memcg reclaim pass aims to free */

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
#define DBG_EV_BIRTH         6   /* a fork or exec in the watched scope of a task not shielded */
#define DBG_EV_RECLAIM_FAIL  7   /* a streak of failed reclaims began in the scope (rate-limited) */
#define DBG_EV_CANCEL        8   /* a client backend's statement cancelled in the kernel (SIGINT) */
#define DBG_EV_WOULD_CANCEL  9   /* the same in dry run: nothing sent */

/* counters[] index */
#define DBG_CTR_FORK_INHERITED     0
#define DBG_CTR_MAP_FULL           1
#define DBG_CTR_EXIT_REMOVED       2
#define DBG_CTR_RECLAIM_PROTECTED  3   /* reclaims entered by shielded processes (and shield cgroups' tasks) */
#define DBG_CTR_RECLAIM_FAILED     4   /* failed reclaims of the scope's tasks and of kill candidates */
#define DBG_CTR_KILLS              5
#define DBG_CTR_WOULD_KILLS        6
#define DBG_CTR_KILL_ERRORS        7
#define DBG_CTR_OOM_VICTIMS        8
#define DBG_CTR_BREACHES           9
#define DBG_CTR_SCORE_TAMPERS      10
#define DBG_CTR_EVENTS_DROPPED     11
#define DBG_CTR_EXE_PROTECTED      12  /* an unlisted task spared: it runs a database server's executable */
#define DBG_CTR_STALE_ENTRIES      13  /* a map entry ignored: its start time is another process's (pid reused) */
#define DBG_CTR_UNLISTED_KILLS     14  /* kills (and would-kills) of tasks the sidecar had not listed */
#define DBG_CTR_BIRTHS             15
#define DBG_CTR_CANCELS            16  /* client backends' statements cancelled in the kernel */
#define DBG_CTR_WOULD_CANCELS      17
#define DBG_CTR_CANCELS_LIMITED    18  /* a cancel held back by cancel_gap_ns (tried again at the next pass) */
#define DBG_CTR_CANCEL_ERRORS      19
#define DBG_CTR_KILLS_FOR_OTHER    20  /* kills (and would-kills) sent for a stuck task that may not be killed */
#define DBG_CTR_NO_VICTIM          21  /* such a task's reclaim kept failing and no victim was at hand */
#define DBG_NR_COUNTERS            22

#define DBG_SCORE_UNKNOWN (-1001)   /* dbg_proc.score before any value was seen */

/* procs[tgid]: protected processes and kill candidates in one map, so every hook needs
 * one lookup and an exit one delete. `start` is the process's start time as /proc/PID/stat
 * gives it (USER_HZ ticks since boot); the kernel ignores an entry whose start is not the
 * current task's, so an entry written for a process that has exited never applies to the
 * process that reuses its pid. Entries the kernel makes at fork have start 0. */
struct dbg_proc {
    u32 flags;
    u32 tier;              /* protection tier */
    u32 cand_tier;         /* candidate tier (kill order), with DBG_CANDIDATE */
    u32 origin;            /* the tgid the sidecar protected (itself, or the inherited-from ancestor) */
    s32 score;             /* last oom_score_adj seen, to tell a lowered shield from a restore */
    u32 pad;
    u64 start;
};

/* streaks[tgid]: consecutive failed reclaims of one process (kernel-owned, LRU). */
struct dbg_streak {
    u64 first_ns;          /* bpf_ktime_get_ns of the first failure of this streak */
    u64 last_ns;           /* and of its last */
    u32 fails;
    u32 reported;          /* a kill or cancel (or their dry-run events) was sent for this streak:
                            * at most one per process per streak */
};

/* victims[]: the tasks that may be killed for one that may not be (shielded, a database
 * executable, too small) whose reclaim keeps failing in the scope (see reclaim.c). The first
 * DBG_VICTIM_SLOTS are the kernel's: killable tasks exec'd in the scope or whose own reclaim
 * failed there, the larger kept when all are taken; the next DBG_LISTED_VICTIMS are the
 * sidecar's: the candidates it would kill next, rewritten at each sync. Cleared at exit. */
#define DBG_VICTIM_SLOTS   16
#define DBG_LISTED_VICTIMS 8
struct dbg_victim {
    u32 tgid;
    u32 flags;             /* its kill event flags (candidate, unlisted, cgroup policy) */
    u64 start;             /* its start time in /proc ticks: a reused pid is never the victim */
    u64 anon_pages;
    u64 seen_ns;           /* its exec or last failed reclaim */
    u32 tier;
    u32 pad;
    u64 scope;             /* the key of the watched scope it lies in (dbg_scope_of): a stuck task's
                            * victim comes from its own scope, never another pod's */
    char comm[16];
};

/* scopes[memory cgroup id]: one watched scope of a set (several databases, each with its own limit). */
struct dbg_scope {
    u32 depth;             /* the cgroup's level (root 0) */
    u32 level;             /* the scope's own pressure level (the sidecar's): its kill gate */
};

/* exes[{inode, device}]: database server executables; a task running one is never killed. */
struct dbg_exe {
    u64 ino;
    u64 dev;               /* the kernel's dev_t: major << 20 | minor */
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
    u32 min_level_to_kill; /* from this level on, fail_streak applies; below it, early_streak */
    u32 fail_streak;       /* consecutive failed reclaims before a kill is allowed */
    u32 fail_pages;        /* a reclaim that freed at most this many pages failed */
    u32 self_tgid;         /* dbguard itself: its score writes are restores, not tampering */
    u32 n_cgroups;         /* entries in cgroups: 0 skips that lookup */
    u32 early_streak;      /* the streak below min_level_to_kill; 0: no kill there */
    u32 scope;             /* DBG_SCOPE_*: unlisted tasks the kernel may kill */
    u32 scope_level;       /* the scope memory cgroup's depth (root 0) */
    u32 births;            /* report forks and execs in the scope (DBG_EV_BIRTH) */
    u64 scope_id;          /* the scope memory cgroup's id (its directory's inode number) */
    u64 min_anon_pages;    /* an unlisted task holding fewer anonymous pages is not killed */
    u64 cancel_gap_ns;     /* at least this long between two in-kernel cancels (any backends) */
    u32 cancel_streak;     /* failed reclaims in a row before a client backend is cancelled */
    u32 cancel_pages;      /* for a client backend, a reclaim that freed at most this many pages failed
                            * (max with fail_pages): its cancel must come while the charge can still
                            * succeed, SIGINT does not end a charge the way SIGKILL does */
    u32 cancel_level;      /* from this level of its scope on, every reclaim pass of a client backend
                            * holding min_anon_pages counts: at the limit, not once reclaim is dry; 0 off */
    u32 pad;
};

struct dbg_event {
    u64 ts_ns;             /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    u64 cgroup_id;         /* cgroup v2 id of the current task */
    u64 a;                 /* kill, cancel: failed-reclaim streak;  oom: anon_rss pages;  tamper: old score + 2000;
                              birth: parent tgid */
    u64 b;                 /* kill, cancel: ns since the streak's first failed reclaim;  oom: file+shmem rss pages;
                              tamper: the entry's start time (0: not known) */
    u32 kind;
    u32 pid;
    u32 tgid;
    u32 level;
    u32 flags;
    u32 tier;
    u32 by_pid;            /* the current task: the allocator (oom) or the writer (tamper) */
    s32 c;                 /* kill, cancel: bpf_send_signal result; oom: victim oom_score_adj; tamper: new score */
    char comm[16];
    char by_comm[16];
    u64 start;             /* kill, cancel: the process's start time (/proc ticks): user space
                              releases a killed victim's memory by pidfd, never a later holder of its pid */
    u64 pages;             /* cancel: the backend's anonymous pages at the cancel */
};

#endif
