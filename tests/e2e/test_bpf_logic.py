"""Pure logic of the BPF loader: map diffs, event decoding and audit records. No root needed."""
from __future__ import annotations

from dataclasses import replace

import pytest

from dbguard.kernel import layout
from dbguard.kernel.events import BpfEvent, decode, event_to_audit
from dbguard.kernel.source import kernel_has_ringbuf
from dbguard.kernel.sync import ProcEntry, diff_plain, diff_procs, listed_victims
from dbguard.sense.procfs import PAGE_SIZE

S, I, H, C = layout.SHIELD, layout.INHERIT, layout.INHERITED, layout.CANDIDATE


def alive(_tgid):
    return True


def test_header_constants_are_parsed():
    assert (S, I, H, C) == (1, 2, 4, 8)
    assert layout.EVENT_KINDS[1] == "kill" and layout.COUNTERS[0] == "fork_inherited"
    assert layout.SCORE_UNKNOWN == -1001


def E(flags, tier, origin, score=0, cand_tier=0):
    return ProcEntry(flags, tier, cand_tier, origin, score)


def test_new_protected_entry_is_its_own_origin_and_unchanged_ones_are_not_rewritten():
    cur = {10: E(S, 1, 10)}
    d = diff_procs(cur, {10: (S, 1), 20: (S | I, 2)}, {}, alive)
    assert d.updates == {20: ProcEntry(S | I, 2, 0, 20, None)} and d.deletes == []


def test_inherited_entries_survive_a_sync_that_does_not_list_them():
    cur = {10: E(S | I, 1, 10), 11: E(S | I | H, 1, 10)}
    d = diff_procs(cur, {10: (S | I, 1)}, {}, alive)
    assert d.updates == {} and d.deletes == []


def test_inherited_entries_go_with_their_origin_or_their_process():
    cur = {10: E(S | I, 1, 10), 11: E(S | I | H, 1, 10), 12: E(S | H, 1, 10)}
    assert diff_procs(cur, {}, {}, alive).deletes == [10, 11, 12]
    d = diff_procs(cur, {10: (S | I, 1)}, {}, lambda t: t != 12)
    assert d.deletes == [12] and d.updates == {}


def test_listing_an_inherited_entry_keeps_it_kernel_owned():
    cur = {11: E(S | I | H, 1, 10, score=5)}
    d = diff_procs(cur, {10: (S | I, 1), 11: (S, 3)}, {}, alive)
    assert d.updates[11] == E(S | H, 3, 10, score=5)


def test_candidates_share_the_map_and_protection_is_kept_beside_them():
    cur = {10: E(S, 1, 10), 30: E(C, 0, 30, cand_tier=2)}
    d = diff_procs(cur, {10: (S, 1)}, {10: 4, 40: 1}, alive)
    assert d.updates == {10: E(S | C, 1, 10, cand_tier=4), 40: ProcEntry(C, 0, 1, 40, None)}
    assert d.deletes == [30]
    assert diff_procs({30: E(C, 0, 30, cand_tier=2)}, {}, {30: 2}, alive) == ({}, [])


def test_plain_diff():
    d = diff_plain({1: 1, 2: 2, 3: 3}, {1: 1, 2: 5, 4: 4})
    assert d.updates == {2: 5, 4: 4} and d.deletes == [3]


def _raw(**kw) -> layout.Event:
    ev = layout.Event()
    for k, v in kw.items():
        setattr(ev, k, v)
    return ev


def test_decode_kill_and_audit_record():
    raw = _raw(kind=1, pid=42, tgid=42, level=3, flags=layout.EVF_CANDIDATE, tier=2, a=5, c=0,
               comm=b"hog", ts_ns=1_000, by_pid=42, start=777)
    ev = decode(raw, wall_offset_ns=1_700_000_000_000_000_000)
    assert ev.kind == "kill" and ev.path == "bpf" and ev.comm == "hog"
    assert ev.ts_ns == 1_700_000_000_000_001_000
    assert ev.detail == {"fail_streak": 5, "tier": 2, "by_cgroup_policy": False, "signal_result": 0,
                         "unlisted": False, "since_first_fail_ns": 0, "start_time": 777}
    rec = event_to_audit(ev)
    assert set(rec) >= {"ts", "action", "target", "reason", "level", "result", "path"}
    assert rec == {**rec, "action": "kill", "target": "hog (pid 42)", "level": "critical",
                   "result": "killed (SIGKILL in kernel)", "path": "bpf"}
    assert "5 times" in rec["reason"]
    # kernel.feed.released says what became of the victim's memory
    done = replace(ev, detail={**ev.detail, "memory_released": True})
    assert event_to_audit(done)["result"] == "killed (SIGKILL in kernel; memory released at once)"
    late = replace(ev, detail={**ev.detail, "memory_released": False, "release": "it had exited"})
    assert event_to_audit(late)["result"] == "killed (SIGKILL in kernel; memory not released: it had exited)"


def test_decode_would_kill_breach_and_tamper():
    would = decode(_raw(kind=2, pid=7, tgid=7, a=3, comm=b"x"), 0)
    assert event_to_audit(would)["result"].startswith("dry_run")
    breach = decode(_raw(kind=4, pid=9, tgid=9, flags=S, a=256, b=0, c=0, comm=b"postgres",
                         by_pid=5, by_comm=b"hog"), 0)
    rec = event_to_audit(breach)
    assert breach.path == "kernel" and rec["result"].startswith("breach") and "hog (pid 5)" in rec["reason"]
    tamper = decode(_raw(kind=5, pid=9, tgid=9, a=2000 + 0, c=700, comm=b"postgres",
                         by_pid=77, by_comm=b"sh"), 0)
    assert tamper.detail == {"old_score_adj": 0, "new_score_adj": 700, "by_pid": 77, "by_comm": "sh",
                             "start_time": None}
    unknown = decode(_raw(kind=5, a=2000 + layout.SCORE_UNKNOWN, c=1), 0)
    assert unknown.detail["old_score_adj"] is None


def test_ringbuf_needs_5_8():
    assert kernel_has_ringbuf("5.8.0") and kernel_has_ringbuf("6.18.44-fc")
    assert not kernel_has_ringbuf("5.4.0-100-generic") and not kernel_has_ringbuf("4.19.0")


def test_bpf_event_is_frozen():
    ev = BpfEvent("kill", 1, 1, "x", 0, 0, 0, 0, {}, "bpf")
    with pytest.raises(AttributeError):
        ev.pid = 2


F = layout.FRESH


def test_entries_carry_the_start_time_they_were_listed_with():
    d = diff_procs({}, {10: (S, 1)}, {20: 2}, alive, starts={10: 111, 20: 222})
    assert d.updates[10].start == 111 and d.updates[20].start == 222
    # a new start for the same pid (the process the caller saw is another one now): rewritten
    cur = {10: ProcEntry(S, 1, 0, 10, 0, 111)}
    assert diff_procs(cur, {10: (S, 1)}, {}, alive, starts={10: 333}).updates[10].start == 333


def test_a_fresh_child_is_kept_until_judged_then_the_callers_verdict_alone_counts():
    cur = {10: E(S, 1, 10), 11: ProcEntry(F | H, 1, 0, 10, 0)}
    kept = diff_procs(cur, {10: (S, 1)}, {}, alive, judged=frozenset({10}))
    assert kept == ({}, [])
    gone = diff_procs(cur, {10: (S, 1)}, {}, alive, judged=frozenset({10, 11}))
    assert gone.deletes == [11]
    listed = diff_procs(cur, {10: (S, 1)}, {11: 3}, alive, judged=frozenset({10, 11}))
    assert listed.updates[11].flags == C and listed.updates[11].cand_tier == 3
    dead = diff_procs(cur, {10: (S, 1)}, {}, lambda t: t != 11)
    assert dead.deletes == [11]


def test_decode_birth_and_a_kill_of_an_unlisted_task():
    birth = decode(_raw(kind=6, pid=5, tgid=5, a=4, flags=layout.EVF_EXEC, comm=b"hog"), 0)
    assert birth.kind == "birth" and birth.detail == {"exec": True, "parent": 4}
    kill = decode(_raw(kind=1, pid=7, tgid=7, a=8, b=250_000, flags=layout.EVF_UNLISTED, comm=b"hog"), 0)
    assert kill.detail["unlisted"] and kill.detail["since_first_fail_ns"] == 250_000
    assert "not listed yet" in event_to_audit(kill)["reason"]
    oom = decode(_raw(kind=3, pid=9, tgid=9, a=1024, b=0, comm=b"x"), 0)
    assert oom.detail["anon_rss_bytes"] == 1024 * 1024, "mark_victim reports kB"


X = layout.CANCEL


def test_cancel_goes_on_listed_shielded_entries_with_a_start_only_and_goes_away_with_the_listing():
    d = diff_procs({}, {10: (S, 1), 11: (S, 1)}, {20: 2}, alive, starts={10: 111, 20: 222},
                   cancel={10, 11, 20, 30})
    assert d.updates[10].flags == S | X
    assert d.updates[11].flags == S, "no start time: the kernel could not tell the backend from a new holder"
    assert d.updates[20].flags == C, "a kill candidate is no backend"
    assert 30 not in d.updates
    # a backend the kernel protected at fork, listed with its start: kernel-owned, flagged
    cur = {1: E(S | I, 1, 1), 12: ProcEntry(S | I | H, 1, 0, 1, 0)}
    d = diff_procs(cur, {1: (S | I, 1), 12: (S, 1)}, {}, alive, starts={1: 5, 12: 444}, cancel={12})
    assert d.updates[12] == ProcEntry(S | H | X, 1, 0, 1, 0, 444)
    # no longer listed for cancel (its session ended, or [bpf] cancel = false): the flag goes
    cur = {12: ProcEntry(S | H | X, 1, 0, 1, 0, 444), 1: ProcEntry(S | I, 1, 0, 1, 0, 5)}
    d = diff_procs(cur, {1: (S | I, 1), 12: (S, 1)}, {}, alive, starts={1: 5, 12: 444})
    assert d.updates[12].flags == S | H
    d = diff_procs(cur, {1: (S | I, 1)}, {}, alive, starts={1: 5})
    assert d.updates[12].flags == S | H, "kept while its origin is protected, without the cancel"


def test_decode_cancel_and_its_audit_record_names_no_query():
    raw = _raw(kind=8, pid=4321, tgid=4321, level=1, flags=S | X, a=2, b=1_500_000, c=0, comm=b"postgres",
               by_pid=4321, start=123_456, pages=25_600)
    ev = decode(raw, 0)
    assert ev.kind == "cancel" and ev.path == "bpf"
    assert ev.detail == {"fail_streak": 2, "since_first_fail_ns": 1_500_000, "start_time": 123_456,
                         "anon_rss_bytes": 25_600 * PAGE_SIZE, "signal_result": 0, "at_limit": False}
    rec = event_to_audit(ev)
    assert rec["action"] == "cancel_query" and rec["path"] == "bpf" and rec["pid"] == 4321
    assert rec["result"] == "cancelled (SIGINT in kernel)" and rec["level"] == "warn"
    assert f"{25_600 * PAGE_SIZE // 2**20} MiB" in rec["reason"] and "backend started 20" in rec["reason"]
    assert rec["reason"].startswith("allocating while reclaim failed 2 times in a row at level warn")
    # At [bpf] cancel_level the passes counted whether or not they failed: the record says so.
    at = event_to_audit(decode(_raw(kind=8, pid=4321, tgid=4321, level=3, flags=S | X | layout.EVF_AT_LIMIT,
                                    a=1, start=5, pages=1), 0))
    assert at["reason"].startswith("allocating at its cgroup's limit at level critical") and "failed or not: 1" in \
        at["reason"] and at["level"] == "critical"
    would = event_to_audit(decode(_raw(kind=9, pid=4321, tgid=4321, a=1, start=5, pages=1), 0))
    assert would["action"] == "cancel_query" and would["result"].startswith("dry_run: would have sent SIGINT")
    failed = event_to_audit(decode(_raw(kind=8, pid=4321, tgid=4321, c=-3), 0))
    assert failed["result"] == "failed: bpf_send_signal returned -3"


def test_decode_a_kill_sent_for_a_task_that_may_not_be_killed():
    raw = _raw(kind=1, pid=70, tgid=70, level=1, a=8, b=90_000, c=0, comm=b"hog", by_pid=12,
               by_comm=b"postgres", flags=layout.EVF_UNLISTED | layout.EVF_FOR_OTHER)
    ev = decode(raw, 0)
    assert ev.path == "bpf" and ev.pid == 70
    assert ev.detail["for_pid"] == 12 and ev.detail["for_comm"] == "postgres"
    rec = event_to_audit(ev)
    assert rec["target"] == "hog (pid 70)" and rec["result"] == "killed (SIGKILL in kernel)"
    assert "for postgres (pid 12)" in rec["reason"] and "8 times" in rec["reason"]
    own = decode(_raw(kind=1, pid=70, tgid=70, a=8, by_pid=70, flags=layout.EVF_UNLISTED), 0)
    assert "for_pid" not in own.detail


def test_listed_victims_give_every_scope_its_largest_first():
    """The kernel takes a stuck task's victim from its own scope only: one big pod must not take
    every listed slot from the others."""
    held = {1: ("/a", 900), 2: ("/a", 800), 3: ("/a", 700), 4: ("/b", 10), 5: ("/c", 50), 6: ("/b", 5)}
    assert listed_victims(held, 3) == [1, 5, 4]
    assert listed_victims(held, 8) == [1, 5, 4, 2, 6, 3]
    assert listed_victims({}, 8) == []
    assert listed_victims({7: ("", 1), 8: ("", 2)}, 8) == [8, 7]
