"""Sense: read what the kernel says about processes and memory. Nothing here changes anything.

procfs    -- processes from /proc (identity, owner, rss, memory cgroup, oom_score_adj)
pressure  -- memory usage, limit, reclaimable cache and PSI of the watched cgroup or host,
             and a wait() that wakes on PSI triggers / usage thresholds
events    -- the kernel's OOM kill counts of the watched scope (memory.events, oom_control, vmstat)
"""
