"""The compile cache's pure parts (dbguard.kernel.objcache): what its key reads, and how BCC's
instructions are kept (map descriptors turned into map names). Loading on the real kernel:
tests/e2e/test_bpf_cache.py."""
from __future__ import annotations

import base64

import pytest

from dbguard.kernel import objcache

PROGS = ["tracepoint__sched__sched_process_exit", "tracepoint__task__task_newtask"]


def insn(code: int, regs: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return bytes([code, regs]) + off.to_bytes(2, "little", signed=True) + imm.to_bytes(4, "little", signed=True)


def ld_map(fd: int, dst: int = 1, src: int = objcache.PSEUDO_MAP_FD) -> bytes:
    return insn(objcache.LD_IMM64, src << 4 | dst, imm=fd) + insn(0)


EXIT = insn(0x95)


def test_the_key_changes_with_each_input(monkeypatch):
    base = objcache.key("int x;", PROGS)
    assert objcache.key("int x;", PROGS) == base
    assert objcache.key("int x;", list(reversed(PROGS))) == base, "the programs' order is no input"
    assert objcache.key("int y;", PROGS) != base
    assert objcache.key("int x;", PROGS[:1]) != base, "the programs are an input"
    for name, value in (("_kernel_build", "#2 SMP other build"), ("_bcc_version", "__version__ = '0.0'"),
                        ("_tracepoint_formats", "field:int other;"), ("_kernel_btf", "0" * 64),
                        ("_possible_cpus", "0-63\n")):
        with monkeypatch.context() as m:
            m.setattr(objcache, name, lambda *a, v=value: v)
            assert objcache.key("int x;", PROGS) != base, name
    with monkeypatch.context() as m:
        m.setattr(objcache.platform, "release", lambda: "0.0.0-other")
        assert objcache.key("int x;", PROGS) != base


def test_map_descriptors_are_kept_as_map_names():
    code = ld_map(7) + insn(0xb7, 2, imm=7) + ld_map(9, dst=3) + EXIT
    e = objcache.entry("src", {PROGS[0]: code}, {}, {7: "procs", 9: "events"}, "GPL", 0, [])
    p = e["programs"][PROGS[0]]
    assert p["maps"] == [[0, "procs"], [3, "events"]], "a mov of 7 is not a map"
    assert base64.b64decode(p["insns"]) == code
    assert e["key"] == objcache.key("src", [PROGS[0]]) and e["source"] == "src"


@pytest.mark.parametrize("code, why", [
    (ld_map(7, src=2) + EXIT, "a 64-bit load of kind 2"),
    (ld_map(8) + EXIT, "descriptor 8 is no map"),
])
def test_instructions_it_cannot_relocate_are_not_kept(code, why):
    with pytest.raises(objcache.Unusable, match=why):
        objcache.entry("src", {PROGS[0]: code}, {}, {7: "procs"}, "GPL", 0, [])


def test_only_tracepoint_programs_are_kept():
    assert objcache.tracepoints(PROGS) == [("sched", "sched_process_exit"), ("task", "task_newtask")]
    for name in ("kprobe__do_exit", "tracepoint__sched", "tracepoint__a__b__c"):
        with pytest.raises(objcache.Unusable, match="not a tracepoint program"):
            objcache.tracepoints([name])


def test_the_compilers_libraries_are_the_ones_recorded():
    found = [p for p in ("/usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0", "/usr/lib/llvm-14/lib/libclang-cpp.so.14",
                         "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", "/usr/lib/x86_64-linux-gnu/libbpf.so.1",
                         "/usr/lib/x86_64-linux-gnu/libc.so.6") if objcache.COMPILER_LIBS.search(p)]
    assert found == ["/usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0", "/usr/lib/llvm-14/lib/libclang-cpp.so.14",
                     "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1"]


def kept(directory, source="src", libs=None):
    """An entry for PROGS stored in `directory` (the key's kernel inputs are this host's)."""
    e = objcache.entry(source, {p: EXIT for p in PROGS}, {}, {}, "GPL", 0,
                       [objcache._file_id(__file__)] if libs is None else libs)
    objcache.store(str(directory), e)
    return objcache.path_for(str(directory), e["key"]), e


def test_an_entry_is_found_only_as_it_was_written(tmp_path):
    d = tmp_path / "bpf"
    with pytest.raises(objcache.Unusable, match="none kept yet") as first:
        objcache.lookup(str(d), "src", PROGS)
    assert first.value.expected, "a first start is no warning"
    path, e = kept(d)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600) and oct(d.stat().st_mode & 0o777) == oct(0o700)
    assert objcache.lookup(str(d), "src", PROGS) == e


def test_an_entry_missing_a_program_is_not_used(tmp_path):
    """Written so by a bug (its checksum made over what it holds): the programs are what the
    loader attaches, so an entry without one of them is a compile, not a guard with a hole."""
    import json
    d = tmp_path / "bpf"
    path, e = kept(d)
    del e["programs"][PROGS[1]]
    e["sum"] = objcache.checksum(e)
    path.write_text(json.dumps(e))
    with pytest.raises(objcache.Unusable, match="holds other programs than the 2 loaded"):
        objcache.lookup(str(d), "src", PROGS)


def test_a_stale_entry_is_a_warning_and_the_compiles_entry_replaces_it(tmp_path):
    d = tmp_path / "bpf"
    old, _ = kept(d, source="old")
    with pytest.raises(objcache.Unusable, match=f"{old.name} was compiled for other inputs") as stale:
        objcache.lookup(str(d), "new", PROGS)
    assert not stale.value.expected
    new, e = kept(d, source="new")
    assert not old.exists() and objcache.lookup(str(d), "new", PROGS) == e


@pytest.mark.parametrize("damage", [
    lambda e: e["programs"][PROGS[0]].update(insns=base64.b64encode(insn(0xb7, imm=1) + EXIT).decode()),
    lambda e: e["maps"].update(procs={"type": 1}),
    lambda e: e.update(license="Proprietary"),
])
def test_a_damaged_entry_fails_its_checksum(tmp_path, damage):
    import json
    d = tmp_path / "bpf"
    path, e = kept(d)
    damage(e)
    path.write_text(json.dumps(e))
    with pytest.raises(objcache.Unusable, match="is damaged") as bad:
        objcache.lookup(str(d), "src", PROGS)
    assert not bad.value.expected
