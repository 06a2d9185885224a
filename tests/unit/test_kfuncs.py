"""The kfunc call rewrite on BPF instructions (dbguard.kernel.kfuncs), byte for byte."""
from __future__ import annotations

import struct

from dbguard.kernel import kfuncs

IDS = {"bpf_task_from_pid": 65822, "bpf_task_release": 65832, "bpf_send_signal_task": 65481}


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def test_placeholder_calls_become_kfunc_calls_and_nothing_else_changes():
    helper_call = insn(kfuncs.CALL, imm=14)                                   # bpf_get_current_pid_tgid
    mov = insn(0xB7, dst=1, imm=kfuncs.PLACEHOLDERS["bpf_task_from_pid"][1])  # the id as a plain value
    code = bytearray(helper_call + insn(kfuncs.CALL, imm=kfuncs.PLACEHOLDERS["bpf_task_from_pid"][1])
                     + mov + insn(kfuncs.CALL, imm=kfuncs.PLACEHOLDERS["bpf_send_signal_task"][1]))
    assert kfuncs.rewrite(code, IDS) == 2
    assert code[:8] == helper_call and code[16:24] == mov
    assert code[8:16] == insn(kfuncs.CALL, src=kfuncs.PSEUDO_KFUNC_CALL, imm=65822)
    assert code[24:32] == insn(kfuncs.CALL, src=kfuncs.PSEUDO_KFUNC_CALL, imm=65481)
    assert kfuncs.rewrite(code, IDS) == 0, "a rewritten call is not rewritten again"


def test_a_kernel_without_every_kfunc_gets_no_defines_and_no_rewrite():
    assert kfuncs.defines({"bpf_task_from_pid": 1}) == {}
    d = kfuncs.defines(IDS)
    assert d["DBG_HAVE_SIGNAL_TASK"] == 1 and d["DBG_KF_SEND_SIGNAL_TASK"] == 0x0DBC0003
    code = bytearray(insn(kfuncs.CALL, imm=0x0DBC0003))
    assert kfuncs.rewrite(code, {"bpf_task_from_pid": 1}) == 0
