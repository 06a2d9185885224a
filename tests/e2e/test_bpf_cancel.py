"""The BPF cancel (issue #18): a PostgreSQL client backend allocating past a small memory
cgroup's limit has its statement cancelled in the kernel, with SIGINT at its failing-reclaim
streak, PostgreSQL's own cancel; the postmaster and the auxiliary processes never get it.

lab/backend_cancel.py runs it: PostgreSQL 15 in a 300 MB memory cgroup, `dbguard run` with
[bpf] cancel and no user-space session answer within reach, one client sorting 20M rows with
work_mem=4GB. The client's own error, the server log, the postmaster's pid and the cgroup's
OOM counter are the independent account; dbguard's audit log says who acted.
"""
from __future__ import annotations

import pytest

from lab.backend_cancel import CANCELLED, run_backend_cancel

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.db, pytest.mark.bpf]


def _bpf_cancels(r) -> list[dict]:
    return [a for a in r.audit if a.get("action") == "cancel_query"]


def test_the_kernel_cancels_the_allocating_backend_and_nothing_else(scenario_host):
    r = run_backend_cancel(log=print)
    story = "\n" + r.summary()
    assert r.peak_bytes >= r.limit_bytes - 8 * 2**20, "the sort never reached the limit: the test proves nothing" + story
    assert r.cancelled, f"the client did not see {CANCELLED!r}" + story
    cancels = _bpf_cancels(r)
    assert cancels and all(a.get("path") == "bpf" for a in cancels), "no in-kernel cancel was recorded" + story
    assert {a["pid"] for a in cancels} == {r.backend_pid}, "a cancel went to another process" + story
    assert all(a["result"] == "cancelled (SIGINT in kernel)" for a in cancels), story
    assert len(cancels) == 1, "more than one cancel for one statement's streak" + story
    rec = cancels[0]
    assert rec["detail"]["start_time"] and rec["detail"]["anon_rss_bytes"] >= 32 * 2**20, story
    assert "backend started" in rec["reason"] and "md5" not in str(rec) and "generate_series" not in str(rec)
    # The server: the postmaster and its auxiliaries never saw SIGINT (a fast shutdown), nothing crashed.
    assert r.postmaster_alive and r.accepts, "PostgreSQL is down after the cancel" + story
    assert r.shutdown_lines == [] and r.crash_recoveries == 0, "the server log shows a shutdown or a crash" + story
    assert r.oom_kills == 0, "the kernel OOM killer fired" + story
    assert not any(a.get("action") in ("kernel_oom_kill", "kill", "terminate_session") for a in r.audit), story
    assert r.guard_running, "dbguard was not running at the end" + story


def test_dry_run_records_the_cancel_and_sends_nothing(scenario_host):
    r = run_backend_cancel(dry_run=True, log=print)
    story = "\n" + r.summary()
    assert r.peak_bytes >= r.limit_bytes - 8 * 2**20, "the sort never reached the limit: the test proves nothing" + story
    assert not r.cancelled, "the statement was cancelled in a dry run" + story
    would = _bpf_cancels(r)
    assert would and all(a["path"] == "bpf" and a["result"].startswith("dry_run: would have sent SIGINT")
                         for a in would), "the kernel's would-cancel was not recorded" + story
    assert {a["pid"] for a in would} == {r.backend_pid}, story
    assert not [ln for ln in r.shutdown_lines if "shutdown request" in ln], "the postmaster got a signal" + story
    assert r.guard_running, story
