"""The loaded programs as the daemon holds them: descriptors handed over by dbguard.kernel.loader,
maps read and written through libbpf (a few hundred kB, no compiler), events read from the
ring buffer (or the perf buffer on kernels before 5.8) with libbpf's readers.

Each map's key and value types come from dbguard.kernel.layout; at load they are checked
against the kernel's own sizes and BCC's field names, so a drift between the C and the
Python mirror stops the daemon with the map named instead of misreading memory.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Callable

from . import layout

# enum bpf_map_type (include/uapi/linux/bpf.h)
HASH, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, RINGBUF = 1, 4, 5, 6, 10, 27
PERCPU = frozenset({PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH})
PERF_PAGES = 8
BATCH = 512             # entries read per bpf_map_lookup_batch call
HASHES = frozenset({1, 9})      # BPF_MAP_TYPE_HASH, LRU_HASH: read in batches (Linux 5.6+)

RING_CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
PERF_CB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_void_p, ct.c_uint32)
LOST_CB = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int, ct.c_uint64)


class MapInfo(ct.Structure):
    """The head of struct bpf_map_info (the kernel fills up to the length it is given)."""
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16)]


_lib = None


def libbpf():
    """libbpf.so.1, which libbcc itself links: present wherever BCC is."""
    global _lib
    if _lib is None:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        vp, i = ct.c_void_p, ct.c_int
        for name, args, res in (
                ("bpf_map_lookup_elem", [i, vp, vp], i), ("bpf_map_update_elem", [i, vp, vp, ct.c_uint64], i),
                ("bpf_map_delete_elem", [i, vp], i), ("bpf_map_get_next_key", [i, vp, vp], i),
                ("bpf_map_lookup_batch", [i, vp, vp, vp, vp, ct.POINTER(ct.c_uint32), vp], i),
                ("bpf_obj_get_info_by_fd", [i, vp, ct.POINTER(ct.c_uint32)], i),
                ("libbpf_num_possible_cpus", [], i),
                ("ring_buffer__new", [i, RING_CB, vp, vp], vp), ("ring_buffer__poll", [vp, i], i),
                ("ring_buffer__free", [vp], None),
                ("perf_buffer__new", [i, ct.c_size_t, PERF_CB, LOST_CB, vp, vp], vp),
                ("perf_buffer__poll", [vp, i], i), ("perf_buffer__free", [vp], None)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _lib = lib
    return _lib


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if libbpf().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        raise OSError(ct.get_errno(), f"bpf_obj_get_info_by_fd({fd}) failed")
    return info


class Map:
    """One BPF map by descriptor, with the subset of BCC's table interface dbguard uses:
    m[key], m[key] = value, del m[key], keys(), items(); per-CPU maps read as a list."""

    def __init__(self, name: str, fd: int, key: type, leaf: type):
        self.name, self.map_fd, self.Key, self.Leaf = name, fd, key, leaf
        self.info = map_info(fd)
        self.percpu = self.info.type in PERCPU
        self._ncpus = libbpf().libbpf_num_possible_cpus() if self.percpu else 1
        self.compiled: tuple[list | None, list | None] = (None, None)     # BCC's field names: key, value
        self._batched: bool | None = None       # whether batch reads work here (None: not tried)

    def _batch_items(self) -> list | None:
        """None when this kernel cannot read the map in batches (then never asked again)."""
        lib, out = libbpf(), []
        keys, values = (self.Key * BATCH)(), (self.Leaf * BATCH)()
        token, prev = ct.create_string_buffer(max(8, ct.sizeof(self.Key))), None
        while True:
            count = ct.c_uint32(BATCH)
            rc = lib.bpf_map_lookup_batch(self.map_fd, prev, token, keys, values, ct.byref(count), None)
            err = ct.get_errno() if rc != 0 else 0
            if rc != 0 and err != errno.ENOENT:
                if out or err not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSPC):
                    raise OSError(err, f"BPF map {self.name}: batch read failed: {os.strerror(err)}")
                self._batched = False
                return None
            ks, vs = ct.sizeof(self.Key), ct.sizeof(self.Leaf)
            out += [(self.Key.from_buffer_copy(keys, i * ks), self.Leaf.from_buffer_copy(values, i * vs))
                    for i in range(count.value)]
            if rc != 0:             # ENOENT: that was the last batch
                self._batched = True
                return out
            prev = ct.byref(token)

    def _value(self):
        return (self.Leaf * self._ncpus)() if self.percpu else self.Leaf()

    def __getitem__(self, key):
        val = self._value()
        if libbpf().bpf_map_lookup_elem(self.map_fd, ct.byref(key), ct.byref(val)) != 0:
            raise KeyError(key)
        return list(val) if self.percpu else val

    def __setitem__(self, key, leaf) -> None:
        if libbpf().bpf_map_update_elem(self.map_fd, ct.byref(key), ct.byref(leaf), 0) != 0:
            err = ct.get_errno()
            raise OSError(err, f"BPF map {self.name}: update failed: {os.strerror(err)}")

    def __delitem__(self, key) -> None:
        if libbpf().bpf_map_delete_elem(self.map_fd, ct.byref(key)) != 0:
            raise KeyError(key)

    def keys(self) -> list:
        out, prev = [], None
        lib = libbpf()
        while True:
            k = self.Key()
            if lib.bpf_map_get_next_key(self.map_fd, ct.byref(prev) if prev is not None else None, ct.byref(k)) != 0:
                return out
            out.append(k)
            prev = k

    def items(self) -> list:
        """Every (key, value): a hash map in batches (one system call per BATCH entries, not
        two per entry), anything else key by key."""
        if self.info.type in HASHES and self._batched is not False:
            out = self._batch_items()
            if out is not None:
                return out
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:
                pass        # gone between the two calls
        return out


class Function:
    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd


def _raw(size: int) -> type:
    return ct.c_ubyte * size


class Loaded:
    """What dbguard.kernel.loader handed over: maps by name (bytes or str), programs by name
    (.funcs, as in BCC), the attachments (kept open: closing them detaches), one event reader."""

    def __init__(self, desc: dict, fds: list[int]):
        self._fds = fds
        self._reader = None
        self._callbacks: tuple = ()
        self.maps: dict[str, Map] = {}
        try:
            for name, m in desc["maps"].items():
                fd = fds[m["fd"]]
                key, leaf = layout.MAP_KEYS.get(name), layout.MAP_VALUES.get(name)
                info = map_info(fd)
                key = key or _raw(max(1, info.key_size))
                leaf = leaf or _raw(max(1, info.value_size))
                self.maps[name] = Map(name, fd, key, leaf)
                self.maps[name].compiled = (m.get("key_fields"), m.get("leaf_fields"))
                check(name, self.maps[name], *self.maps[name].compiled)
            self.funcs = {name.encode(): Function(name, fds[i]) for name, i in desc["progs"].items()}
            self.links = [fds[i] for i in desc["links"]]
        except BaseException:
            self.cleanup()
            raise

    def __getitem__(self, name):
        return self.maps[name.decode() if isinstance(name, bytes) else name]

    def open_events(self, name, on_event: Callable, on_lost: Callable[[int], None]) -> bool:
        """Read events of map `name` with on_event(ctx, data, size); True for a ring buffer."""
        lib, m = libbpf(), self[name]
        if m.info.type == RINGBUF:
            cb = RING_CB(lambda ctx, data, size: on_event(ctx, data, size) or 0)
            self._reader = lib.ring_buffer__new(m.map_fd, cb, None, None)
            self._callbacks, poll, free = (cb,), lib.ring_buffer__poll, lib.ring_buffer__free
        else:
            cb = PERF_CB(lambda ctx, cpu, data, size: on_event(None, data, size))
            lost = LOST_CB(lambda ctx, cpu, count: on_lost(count))
            self._reader = lib.perf_buffer__new(m.map_fd, PERF_PAGES, cb, lost, None, None)
            self._callbacks, poll, free = (cb, lost), lib.perf_buffer__poll, lib.perf_buffer__free
        if not self._reader:
            err = ct.get_errno()
            raise OSError(err, f"BPF map {m.name}: cannot read its events: {os.strerror(err)}")
        self._poll, self._free = poll, free
        return m.info.type == RINGBUF

    def poll(self, timeout_ms: int) -> None:
        if self._reader:
            self._poll(self._reader, timeout_ms)

    def cleanup(self) -> None:
        if self._reader:
            self._free(self._reader)
            self._reader = None
        fds, self._fds = self._fds, []
        for fd in reversed(fds):        # the attachments (handed over last) first
            try:
                os.close(fd)
            except OSError:
                pass


def check(name: str, m: Map, key_fields: list | None, leaf_fields: list | None) -> None:
    """The Python mirror against the kernel's sizes and the compiled C's field names."""
    problems = []
    if ct.sizeof(m.Key) != m.info.key_size and m.info.key_size:
        problems.append(f"key is {m.info.key_size} bytes in the kernel, {ct.sizeof(m.Key)} in dbguard.kernel.layout")
    if ct.sizeof(m.Leaf) != m.info.value_size and m.info.value_size and m.info.type not in (PERF_EVENT_ARRAY, RINGBUF):
        problems.append(f"value is {m.info.value_size} bytes in the kernel, {ct.sizeof(m.Leaf)} in dbguard.kernel.layout")
    for what, compiled, typ in (("key", key_fields, m.Key), ("value", leaf_fields, m.Leaf)):
        mirror = [f[0] for f in getattr(typ, "_fields_", ())]
        if compiled and mirror and compiled != mirror:
            problems.append(f"{what} fields are {compiled} in the C, {mirror} in dbguard.kernel.layout")
    if problems:
        raise ValueError(f"BPF map {name}: " + "; ".join(problems))
