"""Kernel struct offsets from the running kernel's own BTF (/sys/kernel/btf/vmlinux).

BCC compiles against whatever kernel headers are installed, which on these hosts are an
older kernel's (6.1 headers under a 6.18 kernel): a struct field read through them lands on
the wrong bytes. So the programs never dereference kernel structs by name. The few fields
the in-kernel kill needs (the task's memory cgroup, its executable's inode, its start time)
are read with bpf_probe_read_kernel at offsets taken here from the running kernel's BTF and
passed to the compiler as #defines: CO-RE done once, at load, in Python.

Pure parsing (parse_btf, offsets) is tested without root; kernel_offsets() reads the file.
"""
from __future__ import annotations

import struct
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# BTF kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}

# What the programs read: (#define, struct, member path). A path may cross anonymous
# unions/structs (mm_struct keeps exe_file in one) and index arrays ("rss_stat[1]").
FIELDS = (
    ("DBG_OFF_TASK_FLAGS", "task_struct", "flags"),
    ("DBG_OFF_TASK_CGROUPS", "task_struct", "cgroups"),
    ("DBG_OFF_TASK_MM", "task_struct", "mm"),
    ("DBG_OFF_TASK_LEADER", "task_struct", "group_leader"),
    ("DBG_OFF_TASK_START", "task_struct", "start_boottime"),
    ("DBG_OFF_TASK_PENDING", "task_struct", "pending.signal.sig[0]"),
    ("DBG_OFF_CSSSET_SUBSYS", "css_set", "subsys"),
    ("DBG_OFF_CSS_CGROUP", "cgroup_subsys_state", "cgroup"),
    ("DBG_OFF_CGROUP_LEVEL", "cgroup", "level"),
    ("DBG_OFF_CGROUP_KN", "cgroup", "kn"),
    ("DBG_OFF_CGROUP_ANCESTORS", "cgroup", "ancestors"),
    ("DBG_OFF_KN_ID", "kernfs_node", "id"),
    ("DBG_OFF_MM_EXE", "mm_struct", "exe_file"),
    ("DBG_OFF_FILE_INODE", "file", "f_inode"),
    ("DBG_OFF_INODE_INO", "inode", "i_ino"),
    ("DBG_OFF_INODE_SB", "inode", "i_sb"),
    ("DBG_OFF_SB_DEV", "super_block", "s_dev"),
)
ENUMS = (("DBG_MEMORY_CGRP_ID", "cgroup_subsys_id", "memory_cgrp_id"),)


class BtfError(Exception):
    pass


class Btf:
    """Named structs/unions (members with bit offsets), enum values, type sizes."""

    def __init__(self, data: bytes = b"", strings: int = 0):
        self._data, self._strings = data, strings
        # (kind, name, size, ref, extra): names of structs and unions only (the lookups need
        # no other), their members read from the data when a lookup walks them: decoding
        # every member of a kernel's BTF took most of the parse.
        self.types: list[tuple] = [(0, "", 0, 0, None)]
        self.structs: dict[str, int] = {}
        self.enums: dict[str, int] = {}                   # enumerator -> value
        self.enum_of: dict[str, str] = {}                 # enumerator -> enum type name
        self.funcs: dict[str, int] = {}                   # kernel function named bpf_* -> its BTF type id

    def name(self, off: int) -> str:
        if not off:
            return ""
        start = self._strings + off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def resolve(self, tid: int) -> int:
        for _ in range(32):
            kind, _, _, ref, _ = self.types[tid]
            if kind not in _MODIFIERS:
                return tid
            tid = ref
        raise BtfError(f"type {tid}: modifier chain too long")

    def size(self, tid: int) -> int:
        tid = self.resolve(tid)
        kind, _, size, _, extra = self.types[tid]
        if kind == ARRAY:
            elem, nelems = extra
            return self.size(elem) * nelems
        if kind == PTR:
            return 8
        return size

    def _member(self, tid: int, name: str) -> tuple[int, int] | None:
        """(byte offset, member type) of `name` in struct/union tid, through anonymous members."""
        kind, _, _, _, members = self.types[self.resolve(tid)]
        if kind not in (STRUCT, UNION):
            return None
        pos, vlen, kflag = members
        for i in range(vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self._data, pos + 12 * i)
            bits = moff & 0xFFFFFF if kflag else moff
            mname = self.name(name_off)
            if mname == name:
                return bits // 8, mtype
            if not mname:
                inner = self._member(mtype, name)
                if inner is not None:
                    return bits // 8 + inner[0], inner[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        if struct_name not in self.structs:
            raise BtfError(f"struct {struct_name} not in the kernel's BTF")
        tid, off = self.structs[struct_name], 0
        for part in path.split("."):
            name, _, index = part.partition("[")
            m = self._member(tid, name)
            if m is None:
                raise BtfError(f"struct {struct_name} has no member {path}")
            off += m[0]
            tid = m[1]
            if index:
                arr = self.resolve(tid)
                kind, _, _, _, extra = self.types[arr]
                if kind != ARRAY:
                    raise BtfError(f"{struct_name}.{name} is not an array")
                tid = extra[0]
                off += int(index.rstrip("]")) * self.size(tid)
        return off


def parse_btf(data: bytes) -> Btf:
    if len(data) < 24:
        raise BtfError("BTF data too short")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != 0xEB9F:
        raise BtfError("not BTF (bad magic; big-endian BTF is not supported)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types = hdr_len + type_off
    btf = Btf(data, hdr_len + str_off)
    name = btf.name
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
        pos += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        extra = None
        if kind == INT or kind in (VAR, DECL_TAG):
            pos += 4
        elif kind == ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", data, pos)
            extra = (elem, nelems)
            pos += 12
        elif kind in (STRUCT, UNION):
            extra = (pos, vlen, kflag)      # members read when a lookup walks them
            pos += 12 * vlen
        elif kind == ENUM or kind == ENUM64:
            step = 8 if kind == ENUM else 12
            tname = name(name_off)
            for i in range(vlen):
                ename, lo = struct.unpack_from("<Ii", data, pos + i * step)
                if kind == ENUM64:
                    lo = struct.unpack_from("<I", data, pos + i * step + 4)[0] | \
                        struct.unpack_from("<I", data, pos + i * step + 8)[0] << 32
                en = name(ename)
                btf.enums[en] = lo
                btf.enum_of[en] = tname
            pos += step * vlen
        elif kind in (FUNC_PROTO,):
            pos += 8 * vlen
        elif kind == DATASEC:
            pos += 12 * vlen
        elif kind in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
            pass
        else:
            raise BtfError(f"unknown BTF kind {kind}")
        tname = name(name_off) if kind in (STRUCT, UNION) else ""
        btf.types.append((kind, tname, size_or_type, size_or_type, extra))
        if kind == STRUCT and tname and tname not in btf.structs:
            btf.structs[tname] = len(btf.types) - 1
        elif kind == FUNC and data.startswith(b"bpf_", btf._strings + name_off):    # the kfuncs only (KFUNCS)
            btf.funcs.setdefault(name(name_off), len(btf.types) - 1)
    return btf


def offsets(btf: Btf) -> dict[str, int]:
    """The #defines the programs need; BtfError names the first field this kernel lacks."""
    out = {define: btf.offset(st, path) for define, st, path in FIELDS}
    for define, enum, value in ENUMS:
        if value not in btf.enums or (enum and btf.enum_of.get(value) != enum):
            raise BtfError(f"enum value {value} not in the kernel's BTF")
        out[define] = btf.enums[value]
    # A process's anonymous pages: rss_stat[MM_ANONPAGES], a percpu_counter since Linux 6.2
    # (its approximate total `count`), an atomic_long_t in struct mm_rss_stat before.
    anon = btf.enums.get("MM_ANONPAGES")
    if anon is None:
        raise BtfError("enum value MM_ANONPAGES not in the kernel's BTF")
    if "percpu_counter" in btf.structs and _is_array(btf, "mm_struct", "rss_stat"):
        out["DBG_OFF_MM_ANON_PAGES"] = (btf.offset("mm_struct", f"rss_stat[{anon}]")
                                        + btf.offset("percpu_counter", "count"))
    else:
        out["DBG_OFF_MM_ANON_PAGES"] = btf.offset("mm_struct", f"rss_stat.count[{anon}]")
    return out


def _is_array(btf: Btf, struct_name: str, member: str) -> bool:
    m = btf._member(btf.structs[struct_name], member)
    return m is not None and btf.types[btf.resolve(m[1])][0] == ARRAY


# What the programs call besides helpers: kfuncs, by BTF id (dbguard.kernel.kfuncs).
KFUNCS = ("bpf_task_from_pid", "bpf_task_release", "bpf_send_signal_task")

_cache: tuple[dict[str, int], dict[str, int]] | None = None


def _kernel_facts() -> tuple[dict[str, int], dict[str, int]]:
    """(offsets, kfunc ids) of the running kernel, parsed once per process (the parsed BTF
    itself is dropped: it weighs tens of MiB); BtfError says why not."""
    global _cache
    if _cache is None:
        try:
            data = VMLINUX_BTF.read_bytes()
        except OSError as e:
            raise BtfError(f"cannot read {VMLINUX_BTF}: {e.strerror} (a kernel built with "
                           "CONFIG_DEBUG_INFO_BTF=y provides it)") from None
        btf = parse_btf(data)
        _cache = offsets(btf), {f: btf.funcs[f] for f in KFUNCS if f in btf.funcs}
    return _cache


def kernel_offsets() -> dict[str, int]:
    """Offsets for the running kernel; BtfError says why not."""
    return dict(_kernel_facts()[0])


def kernel_kfuncs() -> dict[str, int]:
    """BTF ids of the KFUNCS this kernel has (a kernel older than 6.13 lacks bpf_send_signal_task)."""
    return dict(_kernel_facts()[1])
