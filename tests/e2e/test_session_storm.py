"""The database as its own hog: a dozen PostgreSQL sessions sorting at once, no outside process.

lab/sessions.py runs it: PostgreSQL 15 (shared_buffers=200MB, work_mem=96MB) in a 900 MB
memory cgroup, two `pgbench -S` clients and twelve sessions each sorting pgbench_accounts
(1M rows) by md5 in a loop for 30 s. The control run (no guard) shows what the kernel does:
it OOM-kills a backend and PostgreSQL goes through crash recovery. With `dbguard run` the
kernel OOM killer never fires, there is no crash recovery, the pgbench clients lose no
transaction, and dbguard ends some of the large queries (by pg_cancel_backend, or by SIGINT
from the kernel with [bpf] cancel, as the clients' own errors say) while others finish.
"""
from __future__ import annotations

import pytest

from lab.sessions import run_pg_sessions

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.db]


def test_control_run_crashes(scenario_host):
    r = run_pg_sessions("none", log=print)
    assert r.peak_bytes >= r.limit_bytes - 8 * 2**20, "the sorts never reached the limit: the scenario proves nothing"
    assert r.oom_kills >= 1 and r.crash_recoveries >= 1, \
        "without a guard the kernel was expected to kill a backend: the scenario no longer shows the problem\n" + \
        r.summary()


def test_dbguard_ends_enough_sessions_and_postgresql_never_crashes(scenario_host):
    r = run_pg_sessions("dbguard", log=print)
    story = "\n" + r.summary()
    assert r.peak_bytes >= 0.9 * r.limit_bytes, "the sorts never pressed on the cgroup: the test proves nothing" + story
    assert r.oom_kills == 0, "the kernel OOM killer fired" + story
    assert r.crash_recoveries == 0 and r.database_survived, "PostgreSQL crashed or went down" + story
    assert r.transactions_failed == 0 and r.sessions_lost == 0, "a pgbench client lost a transaction" + story
    assert r.transactions_ok > 0, "pgbench made no progress" + story
    assert r.large.failed == 0, "a large query ended some other way than by a cancel or terminate" + story
    assert r.large.cancelled >= 1, "no large query was cancelled" + story
    assert r.large.finished >= 1, "no large query finished: dbguard ended every one" + story
    assert r.guard_running, "dbguard was not running at the end" + story
    # Who acted: dbguard's own records, by SQL from user space or by SIGINT from the kernel
    # ([bpf] cancel, on by default: a cancel only), on the load's own backends only (their pids as
    # the sessions read them), naming memory and start, never the text.
    ends = [a for a in r.audit if a.get("action") in ("cancel_query", "terminate_session")]
    assert ends and all(a.get("path") in ("user", "bpf") for a in ends), story
    assert {a["pid"] for a in ends} <= r.session_ids, "a backend other than the large queries' was ended" + story
    user = [a for a in ends if a["path"] == "user"]
    bpf = [a for a in ends if a["path"] == "bpf"]
    assert all(a["action"] == "cancel_query" and a["result"] == "cancelled (SIGINT in kernel)" for a in bpf), story
    assert all("statement started" in a.get("reason", "") for a in user), story
    assert all("backend started" in a.get("reason", "") for a in bpf), story
    assert not any("md5" in str(a) or "pgbench_accounts" in str(a) for a in r.audit), "the audit names a query's text"
    assert not any(a.get("action") == "kill" for a in r.audit), "a process was killed" + story
    assert not any(a.get("action") == "kernel_oom_kill" for a in r.audit), story

