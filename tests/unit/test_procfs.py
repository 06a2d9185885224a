"""dbguard.sense.procfs on a fixture /proc tree (tests/fixtures/proc, see its README) and on the real /proc."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dbguard.errors import DbguardError
from dbguard.model import ProcKey
from dbguard.sense import procfs

FIXTURE = str(Path(__file__).resolve().parent.parent / "fixtures" / "proc")
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def procs():
    return procfs.read_procs(FIXTURE)


def test_lists_processes_and_skips_vanished_and_non_numeric(procs):
    assert sorted(procs) == [1, 2, 17, 700, 701, 702, 900, 950, 970, 980, 990]


def test_init(procs):
    p = procs[1]
    assert (p.pid, p.ppid, p.uid, p.comm, p.start_time) == (1, 0, 0, "systemd", 5)
    assert p.exe == "/usr/lib/systemd/systemd"
    assert p.cmdline == "/sbin/init splash"
    assert p.memcg == "/"
    assert not p.kernel_thread


def test_kernel_threads_by_flag_and_parent(procs):
    assert procs[2].kernel_thread                     # kthreadd itself
    kworker = procs[17]
    assert kworker.kernel_thread and kworker.comm == "kworker/0:1-events"
    assert (kworker.exe, kworker.cmdline, kworker.rss_bytes) == ("", "", 0)
    # A usermode helper is a user process, but kthreadd's child: kept out of reach too,
    # and fully read.
    helper = procs[990]
    assert helper.kernel_thread and helper.exe == "/usr/sbin/modprobe" and helper.rss_bytes == 1000 * 1024


def test_postmaster_and_children(procs):
    pm = procs[700]
    assert (pm.ppid, pm.uid, pm.start_time) == (1, 105, 2000)
    assert pm.exe == "/usr/lib/postgresql/15/bin/postgres"
    assert pm.memcg == "/system.slice/system-postgresql.slice/postgresql@15-main.service"
    assert pm.oom_score_adj == -900
    assert pm.rss_bytes == 30000 * 1024
    assert pm.cmdline.startswith("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main")
    assert [procs[c].ppid for c in (701, 702)] == [700, 700]
    assert procs[701].cmdline == "postgres: 15/main: checkpointer"
    assert procs[702].rss_bytes == 520000 * 1024


def test_real_uid_not_effective(procs):
    assert procs[900].uid == 1000          # status Uid: 1000 1001 ...


def test_comm_with_spaces_and_parens(procs):
    p = procs[950]
    assert p.comm == "my (weird) prog) x"
    assert (p.ppid, p.start_time, p.oom_score_adj) == (900, 3100, 500)
    assert len(p.cmdline) == procfs.CMDLINE_MAX and p.cmdline.startswith("weird --flag aaa")


def test_zombie_rss_from_stat(procs):
    z = procs[970]
    assert z.rss_bytes == 3 * PAGE
    assert (z.exe, z.cmdline) == ("", "")


def test_memcg_v2_only(procs):
    assert procs[980].memcg == "/system.slice/app.service"


def test_read_proc_and_same_process():
    assert procfs.read_proc(700, FIXTURE).start_time == 2000
    assert procfs.read_proc(960, FIXTURE) is None     # vanished
    assert procfs.read_proc(12345, FIXTURE) is None   # never there
    assert procfs.same_process(ProcKey(700, 2000), FIXTURE)
    assert not procfs.same_process(ProcKey(700, 2001), FIXTURE)   # pid reused
    assert not procfs.same_process(ProcKey(12345, 2000), FIXTURE)


def test_rss_anon():
    assert procfs.rss_anon(702, FIXTURE) == 250000 * 1024
    assert procfs.rss_anon(970, FIXTURE) == 0          # zombie: no RssAnon line
    assert procfs.rss_anon(12345, FIXTURE) == 0


def test_pss_from_smaps_rollup_and_unreadable_is_none():
    backend = procfs.read_proc(702, FIXTURE)
    assert procfs.read_pss(backend, FIXTURE) == 310500 * 1024
    assert procfs.parse_pss(b"0-0 ---p 0 00:00 0 [rollup]\nRss: 8 kB\nPss_Anon: 1 kB\nPss: 5 kB\n") == 5 * 1024
    assert procfs.read_pss(procfs.read_proc(970, FIXTURE), FIXTURE) is None      # zombie: empty file
    assert procfs.read_pss(procfs.read_proc(700, FIXTURE), FIXTURE) is None      # no smaps_rollup
    # the pid now belongs to another process (start time differs): not read
    from dataclasses import replace
    assert procfs.read_pss(replace(backend, start_time=2501), FIXTURE) is None
    assert procfs.read_pss(replace(backend, pid=12345), FIXTURE) is None         # gone


@pytest.mark.parametrize("text, expected", [
    ("12:memory:/a/b\n0::/c\n", ("/a/b", 1)),
    ("4:cpu,memory:/x\n", ("/x", 1)),
    ("0::/c\n3:cpu:/y\n", ("/c", 2)),
    ("2:name=systemd:/\n", ("", 0)),
    ("3:memory_x:/no\n0::/\n", ("/", 2)),
])
def test_parse_memcg(text, expected):
    assert procfs.parse_memcg(text) == expected


def test_memcg_dir():
    assert procfs.memcg_dir("/a/b", 1, "/sys/fs/cgroup") == "/sys/fs/cgroup/memory/a/b"
    assert procfs.memcg_dir("/", 1, "/sys/fs/cgroup") == "/sys/fs/cgroup/memory"


def test_own_memcg_dir_fixture_and_missing():
    assert procfs.own_memcg_dir(700, FIXTURE) == (
        "/sys/fs/cgroup/memory/system.slice/system-postgresql.slice/postgresql@15-main.service")
    with pytest.raises(DbguardError, match="process 12345 does not exist"):
        procfs.own_memcg_dir(12345, FIXTURE)


# --- the real /proc ------------------------------------------------------------------------

def test_real_proc_finds_self_with_start_time():
    # Expected start time by a plain text parse, independent of procfs.parse_stat.
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    expected_start = int(fields[19])
    procs = procfs.read_procs()
    me = procs[os.getpid()]
    assert me.start_time == expected_start
    assert me.ppid == os.getppid()
    assert me.uid == os.getuid()
    assert me.exe == os.path.realpath(sys.executable)
    assert me.rss_bytes > 0
    assert procfs.same_process(me.key)
    assert procfs.rss_anon(os.getpid()) > 0
    assert procs[1].pid == 1 and not procs[1].kernel_thread


def test_real_proc_child_vanishes():
    child = subprocess.Popen(["sleep", "60"])
    try:
        p = procfs.read_proc(child.pid)
        assert p is not None and p.ppid == os.getpid() and p.comm == "sleep"
        assert p.memcg == procfs.parse_memcg(Path("/proc/self/cgroup").read_bytes())[0]
    finally:
        child.kill()
        child.wait()
    assert procfs.read_proc(child.pid) is None
    assert not procfs.same_process(p.key)


def test_real_own_memcg_dir_exists():
    d = procfs.own_memcg_dir(os.getpid())
    assert os.path.isdir(d), d
    assert os.path.exists(os.path.join(d, "memory.usage_in_bytes")) or os.path.exists(
        os.path.join(d, "memory.current")), f"{d} is not a memory cgroup"


def test_reread_gives_the_same_object_when_nothing_changed(procs):
    p = procs[701]
    assert procfs.reread(p, FIXTURE) is p


def test_reread_takes_memory_score_and_owner_afresh(procs):
    # A table entry from an earlier reading: the fixture (the oracle, read in full) is now.
    now = procs[701]
    old = replace(now, rss_bytes=1, oom_score_adj=7, uid=4242)
    again = procfs.reread(old, FIXTURE)
    assert again == now and again is not now
    assert (again.exe, again.cmdline, again.memcg) == (old.exe, old.cmdline, old.memcg)


@pytest.mark.parametrize("change", [{"start_time": 1}, {"ppid": 3}, {"comm": "renamed"}])
def test_reread_asks_for_a_full_read_of_another_process_or_program(procs, change):
    now = procs[701]
    old = replace(now, **change)
    assert procfs.reread(old, FIXTURE) is None


def test_reread_asks_for_a_full_read_of_a_zombie_or_a_vanished_process(procs):
    assert procfs.reread(procs[970], FIXTURE) is None      # no VmRSS: a full read looks at its threads
    gone = replace(procs[701], pid=960)
    assert procfs.reread(gone, FIXTURE) is None
