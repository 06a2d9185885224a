"""The compile cache on the real kernel (dbguard.kernel.objcache): a restart loads the programs
an earlier compile kept, and only when they were compiled from what it would compile now.

Needs root, BCC and kernel headers (`make setup`); without them every test here FAILS with the
reason and the fix. The end of the module runs key behaviours of tests/e2e/test_bpf.py (the
shield and its inheritance, the reclaim-time kill in a memory cgroup, the kfunc kill from a
stuck task's reclaim, the kernel OOM kill's event, the tail calls) on programs loaded from the
cache, with no compiler in that load: the same tests, so the same expectations.
"""
from __future__ import annotations

import ctypes as ct
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpfload import FROM_CACHE, KEPT, load_cached_guard, load_guard
from dbguard.kernel import objcache
from dbguard.kernel.maps import map_info
from lab import pace

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e]


@pytest.fixture
def cache(tmp_path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d / "bpf"


@pytest.fixture(scope="module")
def bpf_guard(request, tmp_path_factory):
    """The programs compiled once into a fresh state directory, then loaded from its cache as
    a restart loads them: test_bpf's behaviours run on this guard."""
    g = load_cached_guard(request, str(tmp_path_factory.mktemp("state") / "bpf"))
    try:
        yield g
    finally:
        g.close()


def load(request, cache: Path, max_procs: int = 16384, warn: bool | None = None):
    """(the note on what the loader did with the cache, the procs map's size in the kernel);
    `warn`: whether the note must be a warning (None: not checked)."""
    g = load_guard(request, cache_dir=str(cache), max_procs=max_procs)
    try:
        if warn is not None:
            assert g.cache_warn is warn, (warn, g.cache_note)
        return g.cache_note, map_info(g._b["procs"].map_fd).max_entries
    finally:
        g.close()


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("programs-*.json"))


def rewrite(path: Path, change, resum: bool = True) -> None:
    """Change the entry at `path`; resum: with its checksum made again (an entry written so,
    from other inputs or by a bug), else as a damaged disk leaves it."""
    e = json.loads(path.read_text())
    change(e)
    if resum:
        e["sum"] = objcache.checksum(e)
    path.write_text(json.dumps(e))


def test_a_restart_loads_the_kept_programs_without_compiling(request, cache):
    note, _ = load(request, cache, warn=False)
    assert "none kept yet" in note and KEPT in note
    [path] = entries(cache)
    kept = path.stat()
    assert oct(kept.st_mode & 0o777) == oct(0o600) and oct(cache.stat().st_mode & 0o777) == oct(0o700)
    note, size = load(request, cache, warn=False)
    assert note.startswith(FROM_CACHE) and size == 16384
    # A compile always writes its entry: the file untouched is the proof none ran.
    assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in entries(cache)] == \
        [(path, kept.st_ino, kept.st_mtime_ns)]


def test_an_entry_of_other_sizes_is_never_used_and_goes(request, cache):
    note, size = load(request, cache, max_procs=4096)
    assert KEPT in note and size == 4096
    old = entries(cache)
    note, size = load(request, cache, max_procs=8192, warn=True)
    # The kernel's own map size says which programs run: those compiled for 8192 entries.
    assert size == 8192
    assert "compiled for other inputs" in note and KEPT in note
    assert entries(cache) != old and len(entries(cache)) == 1, "the other entry is removed"
    note, size = load(request, cache, max_procs=8192)
    assert note.startswith(FROM_CACHE) and size == 8192


@pytest.mark.parametrize("change, why", [
    (lambda e: e.update(source=e["source"].replace("DBG_MAX_PROCS 16384", "DBG_MAX_PROCS 64")),
     "compiled from other inputs"),
    (lambda e: e.update(key="0" * 64), "compiled from other inputs"),
    (lambda e: e["libs"][0].__setitem__(3, e["libs"][0][3] - 1), "the compiler changed since"),
    (lambda e: e.update(libs=[]), "the compiler changed since"),
    (lambda e: e.update(format=0), "another format"),
    (lambda e: e["programs"].popitem(), "other programs than the 9 loaded"),
])
def test_an_entry_whose_inputs_differ_is_compiled_again(request, cache, change, why):
    load(request, cache)
    [path] = entries(cache)
    rewrite(path, change)
    note, size = load(request, cache, warn=True)
    assert why in note and KEPT in note and size == 16384
    assert load(request, cache)[0].startswith(FROM_CACHE), "the compile's entry replaced it"


def test_programs_the_verifier_refuses_are_compiled_again(request, cache):
    """An entry with the right inputs but other instructions (a damaged disk, a bug) goes to the
    kernel's verifier like any program, which refuses it; the loader compiles instead."""
    load(request, cache)
    [path] = entries(cache)

    def damage(e):
        import base64
        p = next(iter(e["programs"].values()))
        code = bytearray(base64.b64decode(p["insns"]))
        code[-8:] = bytes([0x07, 0x0b, 0, 0, 1, 0, 0, 0])    # r11 += 1: no such register
        p["insns"] = base64.b64encode(code).decode()
    rewrite(path, damage)
    note, _ = load(request, cache, warn=True)
    assert "its programs did not load" in note and KEPT in note
    assert load(request, cache)[0].startswith(FROM_CACHE)


def test_instructions_changed_on_disk_are_never_loaded(request, cache):
    """A damaged entry whose instructions the verifier would accept (a constant changed) fails
    the entry's own checksum: the programs are compiled again, not loaded wrong."""
    import base64
    load(request, cache)
    [path] = entries(cache)

    def damage(e):
        p = e["programs"]["tracepoint__oom__mark_victim"]
        code = bytearray(base64.b64decode(p["insns"]))
        assert code[-8] == 0x95, "the program ends in exit"
        code[-16:-8] = bytes([0xb7, 0, 0, 0, 1, 0, 0, 0])    # r0 = 1 before the exit: verifiable, wrong
        p["insns"] = base64.b64encode(code).decode()
    rewrite(path, damage, resum=False)
    note, _ = load(request, cache, warn=True)
    assert "is damaged (its checksum does not match)" in note and KEPT in note
    assert load(request, cache, warn=False)[0].startswith(FROM_CACHE)


def test_a_damaged_file_or_a_crash_leftover_is_no_harm(request, cache):
    load(request, cache)
    [path] = entries(cache)
    path.write_bytes(path.read_bytes()[:1000])          # cut short
    leftover = cache / f".{path.name}.0123456789abcdef.tmp"   # a write a crash stopped before its rename
    leftover.write_bytes(b"{")
    note, _ = load(request, cache, warn=True)
    assert "unreadable" in note and KEPT in note
    assert not leftover.exists(), "the store removes what a crashed write left"
    assert load(request, cache)[0].startswith(FROM_CACHE)


def test_a_directory_others_can_write_is_neither_read_nor_written(request, cache):
    load(request, cache)
    os.chmod(cache, 0o777)
    note, _ = load(request, cache, warn=True)
    assert "can be written by group or others" in note and "not kept" in note
    os.chmod(cache, 0o700)
    os.chmod(cache.parent, 0o777)
    note, _ = load(request, cache)
    assert "can be written by group or others" in note and "not kept" in note


def test_nothing_stays_in_the_kernel_after_a_crash(request, cache):
    """Nothing is pinned: the programs a killed holder loaded from the cache go with it."""
    load(request, cache)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys
from dbguard.kernel.bpf import BpfGuard
g = BpfGuard.load(cache_dir={str(cache)!r})
ids = []
for f in g._b.funcs.values():
    for line in open(f"/proc/self/fdinfo/{{f.fd}}"):
        if line.startswith("prog_id:"):
            ids.append(line.split()[1])
print(g.cache_note.split(" (")[0], *ids, flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        words = holder.stdout.readline().split()
        ids = [int(w) for w in words if w.isdigit()]
        assert " ".join(words[:5]) == FROM_CACHE and len(ids) == 9
        assert all(prog_exists(i) for i in ids)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + pace.bound(10.0)      # the kernel frees them after an RCU grace period
    while any(prog_exists(i) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [i for i in ids if prog_exists(i)], "programs left in the kernel by a killed holder"
    assert not list(Path("/sys/fs/bpf").rglob("*dbguard*")), "nothing pinned"


def prog_exists(prog_id: int) -> bool:
    from dbguard.kernel.maps import libbpf
    lib = libbpf()
    lib.bpf_prog_get_fd_by_id.argtypes, lib.bpf_prog_get_fd_by_id.restype = [ct.c_uint32], ct.c_int
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd >= 0:
        os.close(fd)
        return True
    return False


def _programs_held(pid: int) -> int:
    """BPF programs among the fds of `pid`; an fd it closes while they are read is not one
    (the daemon reads /proc as it runs: a CI run met one closed between listdir and read)."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            held += "prog_id:" in Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            pass
    return held


def test_the_daemon_restarts_on_the_programs_its_first_start_kept(tmp_path):
    """`dbguard run` twice in one state directory: the second start's kernel path says it runs
    the kept programs, holds every one of them attached, and stops cleanly."""
    from lab.launcher import DbguardRun, base_config
    cfg = base_config(tmp_path)
    cfg["bpf"] = {"enabled": True}
    # Dry run: with no database listed it finds the host's own, and here those are other tests'.
    cfg["general"]["dry_run"] = True
    reasons, held = [], []
    for n in range(2):
        cfg["audit"]["path"] = str(tmp_path / f"audit-{n}.jsonl")
        with DbguardRun(tmp_path, cfg) as run:
            run.wait_protecting(kernel=False)
            _, attached = run.wait_kernel_path()
            reasons.append(attached["result"])
            held.append(_programs_held(run.pid))
        assert run.returncode == 0, run.tail(3)
    assert reasons == ["BPF path active (programs compiled)", "BPF path active (programs from the compile cache)"]
    # The same programs held by descriptor (a program's fdinfo names it; attachments are perf events).
    assert held[1] == held[0] >= 9


# --- the kept programs behave as the compiled ones -------------------------------------------
# Key behaviours of tests/e2e/test_bpf.py, run on `bpf_guard` above (programs loaded from the
# cache): pytest collects what a module imports, in this order, after the tests above (so the
# module's guard is the only one loaded while they run). `bpf` and `big_file` are test_bpf's
# fixtures, here on this module's `bpf_guard`.
from test_bpf import (big_file, bpf, test_a_shielded_allocator_stuck_in_reclaim_gets_the_listed_victim_killed,  # noqa: E402,F401,I001
                      test_direct_reclaim_programs_jump_to_the_memcg_ones, test_fork_inheritance_1000_children,
                      test_kernel_oom_kill_is_audited_with_the_victim, test_reclaim_kill_hits_candidate_and_spares_protected)
