"""The sessions benchmark's per-path first session end (benchmarks/scenario_sessions.py): pure
arithmetic over audit records, checked against hand-worked times."""
from benchmarks.scenario_sessions import first_end_by_path


def test_first_end_per_path_counts_only_ends_carried_out_and_times_them_from_the_limit():
    t0 = 1000.0
    audit = [
        {"ts": t0 + 0.2, "action": "level_change"},
        {"ts": t0 + 1.5, "action": "cancel_query", "path": "user", "result": "failed: connection lost"},
        {"ts": t0 + 1.9, "action": "cancel_query", "path": "bpf", "result": "dry_run: would have sent SIGINT in kernel"},
        {"ts": t0 + 2.0, "action": "cancel_query", "path": "bpf", "result": "cancelled (SIGINT in kernel)"},
        {"ts": t0 + 2.5, "action": "terminate_session", "path": "user", "result": "KILL CONNECTION 7"},
        {"ts": t0 + 3.0, "action": "cancel_query", "path": "user", "result": "KILL QUERY 8"},
    ]
    assert first_end_by_path(audit, t0, limit_at=1.75) == {"user": 0.75, "bpf": 0.25}
    # an end before the limit is negative; no limit reached: nothing to time against
    assert first_end_by_path(audit, t0, limit_at=2.25) == {"user": 0.25, "bpf": -0.25}
    assert first_end_by_path(audit, t0, limit_at=None) == {"user": None, "bpf": None}
    assert first_end_by_path([], t0, limit_at=1.0) == {"user": None, "bpf": None}
