"""Kernel functions (kfuncs) called from dbguard's BCC programs.

BCC 0.26 cannot emit a kfunc call (it has no __ksym externs). So the programs call each kfunc
as if it were a helper with a placeholder id (DBG_KF_*, defined by program_source), and the
loader rewrites every such call into a kfunc call (src_reg BPF_PSEUDO_KFUNC_CALL, imm the
function's BTF id in the running kernel) just before the program goes to the verifier, which
then checks it like any kfunc call (a trusted task pointer, released on every path). A
placeholder left unrewritten is an unknown helper: the verifier refuses the program.

bpf_send_signal_task (Linux 6.13; tracepoint programs may call kfuncs since 6.12) lets the
reclaim program kill a task other than the one allocating: see dbguard/bpf/reclaim.c.
"""
from __future__ import annotations

from .btf import KFUNCS

# kfunc -> (#define the C uses, placeholder helper id: far above any real helper's)
PLACEHOLDERS = {
    "bpf_task_from_pid": ("DBG_KF_TASK_FROM_PID", 0x0DBC0001),
    "bpf_task_release": ("DBG_KF_TASK_RELEASE", 0x0DBC0002),
    "bpf_send_signal_task": ("DBG_KF_SEND_SIGNAL_TASK", 0x0DBC0003),
}
assert set(PLACEHOLDERS) == set(KFUNCS)

CALL = 0x85                 # BPF_JMP | BPF_CALL
PSEUDO_KFUNC_CALL = 2       # src_reg of a kfunc call (imm: the BTF id in vmlinux)
INSN = 8


def defines(ids: dict[str, int]) -> dict[str, int]:
    """The #defines for program_source: the placeholders, and DBG_HAVE_SIGNAL_TASK when the
    kernel has every kfunc (ids: btf.kernel_kfuncs())."""
    if set(ids) < set(PLACEHOLDERS):
        return {}
    return {"DBG_HAVE_SIGNAL_TASK": 1, **{define: pid for define, pid in PLACEHOLDERS.values()}}


def rewrite(code, ids: dict[str, int]) -> int:
    """Rewrite the placeholder helper calls in `code` (a writable buffer of BPF instructions)
    into kfunc calls of `ids`; returns how many were rewritten."""
    by_placeholder = {pid: ids[name] for name, (_, pid) in PLACEHOLDERS.items() if name in ids}
    n = 0
    for off in range(0, len(code) - INSN + 1, INSN):
        if code[off] != CALL or code[off + 1] >> 4:
            continue
        imm = int.from_bytes(bytes(code[off + 4:off + 8]), "little", signed=True)
        if imm in by_placeholder:
            code[off + 1] = (code[off + 1] & 0x0F) | PSEUDO_KFUNC_CALL << 4
            code[off + 4:off + 8] = by_placeholder[imm].to_bytes(4, "little")
            n += 1
    return n


def bcc_class(ids: dict[str, int]):
    """bcc.BPF, rewriting placeholder calls in each program before it is loaded (BCC loads
    the tracepoint programs from its constructor, through load_func); each program's
    instructions as BCC made them (before the rewrite) are kept in .compiled, by name."""
    import ctypes as ct

    from bcc import BPF, lib

    class KfuncBPF(BPF):
        def load_func(self, func_name, prog_type, *args, **kw):
            name = func_name.encode() if isinstance(func_name, str) else func_name
            start = lib.bpf_function_start(self.module, name)
            if start and name not in self.funcs:
                size = lib.bpf_function_size(self.module, name)
                code = (ct.c_uint8 * size).from_address(start)
                self.__dict__.setdefault("compiled", {})[name.decode()] = bytes(code)
                rewrite(memoryview(code).cast("B"), ids)
            return super().load_func(func_name, prog_type, *args, **kw)

    return KfuncBPF
