"""The kernel's OOM killer marking a victim of dbguard's own in-kernel kill (it finds the task
dying and reaps it, no new kill, no oom_kill counted) is audited as that, not as a kernel kill.
Seen in a CI run: a hog killed by the BPF program for a stuck backend, then 'kernel OOM killer
chose it ... killed by the kernel' 32 ms later while the cgroup's oom_kill counter stayed 0."""
from __future__ import annotations

from dbguard.kernel.events import BpfEvent, OwnKills, event_to_audit

MS = 10**6
T0 = 1_700_000_000 * 10**9


def kill(tgid: int, at: int, rc: int = 0) -> BpfEvent:
    return BpfEvent(kind="kill", pid=tgid, tgid=tgid, comm="hog", ts_ns=at, level=3, flags=0, cgroup_id=1,
                    detail={"signal_result": rc, "for_pid": 7, "for_comm": "postgres", "fail_streak": 8})


def marked(tgid: int, at: int) -> BpfEvent:
    return BpfEvent(kind="oom_victim", pid=tgid, tgid=tgid, comm="hog", ts_ns=at, level=3, flags=0, cgroup_id=1,
                    detail={"anon_rss_bytes": 130 << 20, "oom_score_adj": 500, "candidate": True,
                            "trigger_pid": 8, "trigger_comm": "hog"}, path="kernel")


def results(events: list[BpfEvent]) -> list[str]:
    own = OwnKills()
    return [event_to_audit(own.see(ev))["result"] for ev in events]


def test_a_victim_of_our_kill_marked_by_the_oom_killer_is_audited_as_reaped():
    assert results([kill(100, T0), marked(100, T0 + 32 * MS)]) == [
        "killed (SIGKILL in kernel)", "reaped by the kernel after dbguard's in-kernel kill"]


def test_a_process_dbguard_did_not_kill_is_the_kernels_own_kill():
    assert results([kill(100, T0), marked(200, T0 + 32 * MS)])[1] == "killed by the kernel (a kill candidate)"


def test_a_failed_kill_or_an_old_one_does_not_count():
    assert results([kill(100, T0, rc=-3), marked(100, T0 + 32 * MS)])[1] == "killed by the kernel (a kill candidate)"
    assert results([kill(100, T0), marked(100, T0 + 11_000 * MS)])[1] == "killed by the kernel (a kill candidate)"
