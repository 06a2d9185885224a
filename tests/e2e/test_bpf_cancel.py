"""The BPF cancel (issue #18): a PostgreSQL client backend allocating past a small memory
cgroup's limit has its statement cancelled in the kernel, with SIGINT at its failing-reclaim
streak, PostgreSQL's own cancel; the postmaster and the auxiliary processes never get it.

lab/backend_cancel.py runs it: PostgreSQL 15 in a 300 MB memory cgroup, `dbguard run` with
[bpf] cancel as its config says (on by default) and no user-space session answer within reach,
one client sorting 20M rows with work_mem=4GB. The client's own error, the server log, the
postmaster's pid, the cgroup's OOM counter and a tracer of SIGINT while the statements run
(benchmarks/reclaim_latency.py: the signal_generate raw tracepoint, not dbguard's programs)
are the independent account; dbguard's audit log says who acted.

What is asserted is PostgreSQL's own error text and the kernel's record of each SIGINT, never a
test allocator's exit status: a Python process whose parent ignored SIGINT (pytest started in
the background under nohup, from a shell that is not interactive) inherits SIG_IGN and keeps
it (Python installs its KeyboardInterrupt handler only where SIGINT is not ignored), so a
cancelled Python allocator runs on and ends some other way instead of dying by signal 2; a
PostgreSQL backend installs its own SIGINT handler whatever it inherited.
"""
from __future__ import annotations

import pytest

from benchmarks.reclaim_latency import Tracer
from lab.backend_cancel import CANCELLED, run_backend_cancel

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.db, pytest.mark.bpf]

SIGINT = 2
# The tracer's path of a SIGINT sent with SI_KERNEL: dbguard's bpf_send_signal (it sees it from
# inside dbguard's reclaim program: signal_generate is a raw tracepoint there); a kill() such as
# pg_cancel_backend's is "user". It records signals generated as delivered: one the BPF program
# sent to a process that ignores SIGINT would not show; the audit and the server log cover those.
IN_KERNEL = "bpf"


def _cancels(r, path: str | None = None) -> list[dict]:
    return [a for a in r.audit if a.get("action") == "cancel_query" and path in (None, a.get("path"))]


def _sigints(tracer: Tracer, pids) -> dict[int, list[str]]:
    """pid -> the path of each SIGINT delivered to it (bpf: the kernel's bpf_send_signal, user: a
    kill() such as pg_cancel_backend's)."""
    out: dict[int, list[str]] = {}
    for k in tracer.latencies.of(pids).kills:
        out.setdefault(k.target, []).append(k.path)
    return out


def _server_not_signalled(r, tracer: Tracer, story: str) -> None:
    """The postmaster and every other server process (auxiliaries, dbguard's own backend) got no
    SIGINT while the statements ran (the tracer: none generated for them), none was audited,
    dbguard killed or terminated nothing, and the postmaster and dbguard are up at the end."""
    others = ({r.postmaster_pid} | set(r.server_pids)) - r.backend_pids
    assert not tracer.targets & others, f"SIGINT sent to server processes {tracer.targets & others}" + story
    assert {a["pid"] for a in _cancels(r)} <= r.backend_pids, "a cancel was recorded for another process" + story
    assert r.postmaster_alive and r.accepts, "PostgreSQL is down after the cancel" + story
    assert not any(a.get("action") in ("kill", "terminate_session") for a in r.audit), story
    assert r.guard_running, "dbguard was not running at the end" + story


def _server_untouched(r, tracer: Tracer, story: str) -> None:
    """_server_not_signalled, and the server neither shut down nor crashed: no kernel OOM kill."""
    _server_not_signalled(r, tracer, story)
    assert r.shutdown_lines == [] and r.crash_recoveries == 0, "the server log shows a shutdown or a crash" + story
    assert r.oom_kills == 0, "the kernel OOM killer fired" + story
    assert not any(a.get("action") == "kernel_oom_kill" for a in r.audit), story


def test_by_default_the_kernel_cancels_the_allocating_backend_and_nothing_else(scenario_host):
    tracer = Tracer(sig=SIGINT)
    r = run_backend_cancel(kernel_cancel=None, during=tracer, log=print)    # [bpf] cancel left to its default
    story = "\n" + r.summary()
    assert r.peak_bytes >= r.limit_bytes - 8 * 2**20, "the sort never reached the limit: the test proves nothing" + story
    assert r.cancelled, f"the client did not see {CANCELLED!r}" + story
    cancels = _cancels(r)
    assert cancels and all(a.get("path") == "bpf" for a in cancels), "no in-kernel cancel was recorded" + story
    assert {a["pid"] for a in cancels} == {r.backend_pid}, "a cancel went to another process" + story
    assert all(a["result"] == "cancelled (SIGINT in kernel)" for a in cancels), story
    assert len(cancels) == 1, "more than one cancel for one statement's streak" + story
    rec = cancels[0]
    assert rec["detail"]["start_time"] and rec["detail"]["anon_rss_bytes"] >= 32 * 2**20, story
    assert "backend started" in rec["reason"] and "md5" not in str(rec) and "generate_series" not in str(rec)
    assert _sigints(tracer, {r.backend_pid}) == {r.backend_pid: [IN_KERNEL]}, \
        f"the kernel's record of SIGINTs to the backend: {_sigints(tracer, {r.backend_pid})}" + story
    _server_untouched(r, tracer, story)


def test_once_per_streak_a_backend_is_cancelled_again_at_its_next_statement(scenario_host):
    """The same backend runs the sort twice: each statement's failing streak gets its own
    cancel (cancel_interval 0.05 s is long past), one each, in the kernel."""
    tracer = Tracer(sig=SIGINT)
    r = run_backend_cancel(kernel_cancel=None, repeat=2, during=tracer, log=print)
    story = "\n" + r.summary()
    assert r.statements_cancelled == [True, True], \
        f"each statement should end with {CANCELLED!r}: {r.statements}" + story
    cancels = _cancels(r, "bpf")
    assert [a["pid"] for a in cancels] == [r.backend_pid] * 2, "one kernel cancel per statement" + story
    assert _cancels(r, "user") == [], story
    assert _sigints(tracer, {r.backend_pid}) == {r.backend_pid: [IN_KERNEL, IN_KERNEL]}, story
    # Each cancel times its streak from that statement's first failure: within the statement as
    # the client timed it (the second's streak is not the first's carried over).
    since = [a["detail"]["since_first_fail_ns"] / 1e9 for a in cancels]
    assert all(0 <= s <= d for s, d in zip(since, r.durations)), \
        f"streak ages {since} s against statements of {r.durations} s" + story
    _server_untouched(r, tracer, story)


def test_from_cancel_level_on_the_cancel_comes_at_the_limit(scenario_host):
    """[bpf] cancel_level = 1 (warn): every reclaim pass of the sorting backend counts, failed or
    not, so its cancel goes at the limit while reclaim still meets the allocation in flight. The
    second statement starts with its cgroup's page cache spent by the first and the level raised
    by it: its cancel comes by that rule (the audit's at_limit), and both statements end with
    PostgreSQL's cancel, no OOM kill. With cancel_level = 0 the cancel waits for a pass that
    frees nothing, and the kernel's OOM killer took the backend in 4 of 10 runs of
    benchmarks.cancel_again (benchmarks/CANCEL-AGAIN-RESULTS.md, 2026-12-03)."""
    tracer = Tracer(sig=SIGINT)
    r = run_backend_cancel(kernel_cancel=None, repeat=2, bpf={"cancel_level": 1}, during=tracer, log=print)
    story = "\n" + r.summary()
    assert r.statements_cancelled == [True, True], \
        f"each statement should end with {CANCELLED!r}: {r.statements}" + story
    cancels = _cancels(r, "bpf")
    assert [a["pid"] for a in cancels] == [r.backend_pid] * 2, "one kernel cancel per statement" + story
    assert cancels[1]["detail"]["at_limit"] and cancels[1]["level"] in ("warn", "high", "critical"), \
        "the second statement's cancel did not come by cancel_level" + story
    assert "limit" in cancels[1]["reason"] and "failed or not" in cancels[1]["reason"], story
    assert _sigints(tracer, {r.backend_pid}) == {r.backend_pid: [IN_KERNEL, IN_KERNEL]}, story
    _server_untouched(r, tracer, story)


def test_cancel_false_leaves_the_backend_to_user_space(scenario_host):
    """[bpf] cancel = false: the kernel sends no SIGINT; the statement is left to the user-space
    answer (pg_cancel_backend at level high). That answer races the sort to the limit: it won
    3 of 3 runs of benchmarks.cancel_latency, and lost one run here (the kernel OOM-killed the
    backend 0.36 s in), which is why the kernel's cancel is on by default. So what is asserted
    is who signalled, whatever the statement's end."""
    tracer = Tracer(sig=SIGINT)
    r = run_backend_cancel(kernel_cancel=False, during=tracer, log=print)
    story = "\n" + r.summary()
    assert r.peak_bytes >= 0.9 * r.limit_bytes, "the sort never pressed on the cgroup: the test proves nothing" + story
    assert _cancels(r, "bpf") == [], "the kernel cancelled with [bpf] cancel = false" + story
    paths = _sigints(tracer, {r.backend_pid}).get(r.backend_pid, [])
    assert set(paths) <= {"user"}, f"SIGINTs to the backend by path: {paths}" + story
    if r.cancelled:
        assert paths and {a["pid"] for a in _cancels(r, "user")} == {r.backend_pid}, story
    else:
        assert r.oom_kills >= 1, f"the statement ended neither by a cancel nor by the kernel: {r.client_error}" + story
    others = ({r.postmaster_pid} | set(r.server_pids)) - r.backend_pids
    assert not tracer.targets & others, f"SIGINT sent to server processes {tracer.targets & others}" + story
    assert r.guard_running, story


def test_dry_run_records_the_cancel_and_sends_nothing(scenario_host):
    tracer = Tracer(sig=SIGINT)
    r = run_backend_cancel(kernel_cancel=None, dry_run=True, during=tracer, log=print)
    story = "\n" + r.summary()
    assert r.peak_bytes >= r.limit_bytes - 8 * 2**20, "the sort never reached the limit: the test proves nothing" + story
    assert not r.cancelled, "the statement was cancelled in a dry run" + story
    would = _cancels(r)
    assert would and all(a["path"] == "bpf" and a["result"].startswith("dry_run: would have sent SIGINT")
                         for a in would), "the kernel's would-cancel was not recorded" + story
    assert {a["pid"] for a in would} == {r.backend_pid}, story
    server = {r.postmaster_pid} | set(r.server_pids) | r.backend_pids
    assert not tracer.targets & server, f"SIGINT sent in a dry run to {tracer.targets & server}" + story
    assert not [ln for ln in r.shutdown_lines if "shutdown request" in ln], "the postmaster got a signal" + story
    assert r.guard_running, story


@pytest.mark.parametrize("gap, kernel_cancels", [(0, 2), (60, 1)])
def test_cancel_interval_spaces_the_kernels_cancels_across_backends(scenario_host, gap, kernel_cancels):
    """Two backends sort at once, the user-space session answer out of reach. [bpf]
    cancel_interval = 0: each is cancelled in the kernel at its own streak. 60: one of them
    only; the other's streak is left to the kill path, which spares database processes (the
    kernel then OOM-kills a backend if that sort does not fit once the first has let go).

    In reach, the user-space answer races the kernel: in a CI rehearsal on a slower machine
    (2026-12-02, git 5cb8b55) it cancelled both sessions at level high, at 144 and 231 MiB, 0.8 s
    in, before either reclaimed in vain, and the interval was never put to the test; so it is
    kept out of reach here (the sessions scenario in benchmarks/RESULTS.md measures it).

    What is asserted is who was cancelled, and by whom, not that the server survives: two sorts
    growing at once in 300 MB can outrun the cancel. A backend blocked in its own failing
    reclaim runs its cancel only once its allocation is met; where nothing is left to reclaim
    the kernel OOM-kills a backend first. In a CI rehearsal (2026-12-02, git 8451221) both
    backends were cancelled in the kernel at their first failing reclaim and the kernel then
    OOM-killed one of them (crash recovery) when dbguard's own session allocated; six reruns
    passed. Against sessions that hold the memory, the user-space answer at level high acts
    before that (the sessions scenario, benchmarks/RESULTS.md); the one-backend tests above
    assert the server's survival."""
    tracer = Tracer(sig=SIGINT)
    r = run_backend_cancel(kernel_cancel=None, backends=2, bpf={"cancel_interval": gap}, user_answer=False,
                           during=tracer, log=print)
    story = "\n" + r.summary()
    cancels = _cancels(r, "bpf")
    assert len(cancels) == kernel_cancels, f"{len(cancels)} kernel cancels with cancel_interval = {gap}" + story
    assert len({a["pid"] for a in cancels}) == kernel_cancels and {a["pid"] for a in cancels} <= r.backend_pids, story
    in_kernel = {pid for pid, paths in _sigints(tracer, r.backend_pids).items() if IN_KERNEL in paths}
    assert in_kernel == {a["pid"] for a in cancels}, f"the tracer saw kernel SIGINTs to {in_kernel}" + story
    _server_not_signalled(r, tracer, story)
    if gap == 0 and not r.crash_recoveries:
        assert all(r.statements_cancelled), story
