"""Test, demo and benchmark laboratory: not part of the installed package; used by tests/,
benchmarks/ and `make demo`.

    require     what the host must have; one line naming what is missing
    cgroup      memory cgroups made under our own, removed (with what is left in them) after
    hog         the memory hog, `python -m lab.hog`: anonymous or shared memory, page cache, churn
    procs       child processes that are always reaped; /proc readers; wait_until
    launcher    `dbguard run` as a child process: config, readiness, audit log, SIGHUP, SIGTERM
    pgcluster   a throwaway PostgreSQL 15; pgoutput parses pgbench and its server log
    mariadb     a throwaway MariaDB and the range-read load run against it
    scenario    the issue's PostgreSQL memory scenario; watch times what happened in it
    demo        `make demo`
"""
