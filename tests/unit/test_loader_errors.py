"""The loader child's one-line error from what BCC printed (dbguard.kernel.loader): a verifier
rejection keeps the verifier's decisive line, not only its "processed N insns" summary."""
from __future__ import annotations

from dbguard.kernel.loader import _first_error, _verifier_error

SUMMARY = "processed 12 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 0"
# As BCC printed it on Linux 6.18 for a call of an unknown helper (register states cut short).
LOG = f"""bpf: Failed to load program: Invalid argument
0: R1=ctx() R10=fp0
; dbg_count(ev.c ? DBG_CTR_KILL_ERRORS : DBG_CTR_KILLS);
11: (b7) r1 = 1                       ; R1=1
12: (85) call unknown#230424585
invalid func unknown#230424585
{SUMMARY}
"""
EXC = "Failed to load BPF program b'tracepoint__vmscan__mm_vmscan_memcg_reclaim_begin': Invalid argument"


def test_the_decisive_line_the_instruction_and_the_program_are_kept():
    line = _verifier_error(LOG, EXC)
    assert line == ("tracepoint__vmscan__mm_vmscan_memcg_reclaim_begin: invalid func unknown#230424585 "
                    f"(at 12: (85) call unknown#230424585); {SUMMARY}")
    assert "\n" not in line


def test_a_hint_after_the_summary_is_kept_and_states_are_not():
    log = LOG.replace("12: (85) call unknown#230424585\ninvalid func unknown#230424585\n",
                      "12: (61) r2 = *(u32 *)(r0 +0)        ; R0=map_value_or_null(id=1)\n"
                      "R0 invalid mem access 'map_value_or_null'\n")
    log += "HINT: The invalid mem access 'map_value_or_null' is caused by a missing null check.\n"
    line = _verifier_error(log)
    assert line.startswith("R0 invalid mem access 'map_value_or_null' (at 12: (61) r2 = *(u32 *)(r0 +0)); HINT: ")
    assert "R0=map_value_or_null(id=1)" not in line and line.endswith(SUMMARY)


def test_a_decision_on_several_lines_keeps_up_to_three():
    log = LOG.replace("invalid func unknown#230424585\n", "Unreleased reference id=3 alloc_insn=10\nextra 1\nextra 2\n")
    assert _verifier_error(log).startswith("Unreleased reference id=3 alloc_insn=10 extra 1 extra 2 (at 12:")


def test_without_a_verifier_log_the_compiler_error_is_used():
    text = "/virtual/main.c:3:1: error: unknown type name 'this'\n1 error generated.\n"
    assert _verifier_error(text) is None
    assert _first_error(text) == "/virtual/main.c:3:1: error: unknown type name 'this'"
