"""Processes as /proc shows them: identity, owner, memory, memory cgroup, OOM score.

Runs every cycle on hosts with thousands of processes, so it reads raw bytes with
os.open/os.read (no buffered text files, no subprocesses) and as few files per process
as it can: stat, status, cgroup, oom_score_adj, cmdline and the exe link. Kernel threads
need only stat. A process that exits while it is being read is left out without a word.
PSS (smaps_rollup: a walk over the page tables) is not part of the sample; the policy asks
read_pss for it, for the few processes a pss_above rule needs it of.
"""
from __future__ import annotations

import os
from sys import intern

from ..errors import DbguardError
from ..model import Proc, ProcKey

PF_KTHREAD = 0x00200000
KTHREADD_PID = 2
CMDLINE_MAX = 256
CGROUP_ROOT = "/sys/fs/cgroup"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Everything a process can do to us while we read it: exit (ENOENT/ESRCH), or be a zombie
# whose files went empty (ValueError/IndexError when parsing).
_GONE = (FileNotFoundError, ProcessLookupError, ValueError, IndexError)


_O_READ = os.O_RDONLY | os.O_CLOEXEC

# One int object for a value many processes hold alike (a parent's pid, a uid, a start tick, the
# RSS of identical workers): 28 bytes each, per field, per process, in a table that holds every
# process. Bounded: emptied when full, so values that are not shared cost no more than that.
_SHARED_MAX = 1024
_shared: dict[int, int] = {}


def _share(v: int) -> int:
    got = _shared.get(v)
    if got is None:
        if len(_shared) >= _SHARED_MAX:
            _shared.clear()
        got = _shared[v] = v
    return got


def _read(path: str, size: int = 65536, dir_fd: int | None = None) -> bytes:
    """One read() call: /proc files made in one go (stat, status, cgroup) come whole in it."""
    fd = os.open(path, _O_READ, dir_fd=dir_fd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


# --- pure parsers (tested on fixture text) ---------------------------------------------

def parse_stat(data: bytes) -> tuple[str, list[bytes]]:
    """(comm, fields from field 3 on). comm may hold spaces and ')': split at the last ')'."""
    open_paren = data.index(b"(")
    close_paren = data.rindex(b")")
    comm = data[open_paren + 1:close_paren].decode("utf-8", "replace")
    return comm, data[close_paren + 2:].split()


# Indexes into parse_stat's field list: field N of proc(5) is at N - 3.
_STATE, _PPID, _FLAGS, _STARTTIME, _RSS = 0, 1, 6, 19, 21


def _status_field(data: bytes, key: bytes) -> int | None:
    """First number after "\nKey:" in status text (found, not split: this runs per process)."""
    at = data.find(key)
    if at < 0:
        return None
    end = data.find(b"\n", at + 1)
    return int(data[at + len(key):end if end >= 0 else None].split(None, 1)[0])


def parse_status(data: bytes) -> tuple[int, int | None, int | None]:
    """(real uid, VmRSS bytes or None, RssAnon bytes or None) from /proc/PID/status."""
    uid = _status_field(data, b"\nUid:")
    if uid is None:
        raise ValueError("status without Uid")
    vm_rss = _status_field(data, b"\nVmRSS:")
    rss_anon = _status_field(data, b"\nRssAnon:")
    return (uid, None if vm_rss is None else vm_rss * 1024,
            None if rss_anon is None else rss_anon * 1024)


def parse_pss(data: bytes) -> int | None:
    """PSS bytes from /proc/PID/smaps_rollup text ("Pss:" in kB), None without that line
    (a zombie's or a kernel thread's file is empty)."""
    pss = _status_field(data, b"\nPss:")
    return None if pss is None else pss * 1024


def parse_memcg(data: bytes | str) -> tuple[str, int]:
    """(path, version) of the memory cgroup in /proc/PID/cgroup text.

    The v1 line whose controllers include "memory" wins; without one, the v2 "0::" line.
    ("", 0) when neither is there (no cgroups at all).
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    v2 = None
    for line in data.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            return path, 1
        if hid == "0" and controllers == "":
            v2 = path
    if v2 is not None:
        return v2, 2
    return "", 0


def parse_cmdline(data: bytes) -> str:
    return data.replace(b"\0", b" ").rstrip()[:CMDLINE_MAX].decode("utf-8", "replace")


# --- readers ---------------------------------------------------------------------------

def read_proc(pid: int, root: str = "/proc") -> Proc | None:
    """One process, or None when it does not exist (any more)."""
    try:
        # Every file is read through one handle on /proc/PID: if the process exits and its
        # pid is reused meanwhile, the reads fail instead of mixing two processes' facts.
        dir_fd = os.open(f"{root}/{pid}", _O_READ | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return _read_proc_at(pid, dir_fd)
    finally:
        os.close(dir_fd)


def _read_proc_at(pid: int, d: int) -> Proc | None:
    try:
        comm, f = parse_stat(_read("stat", dir_fd=d))
        ppid = int(f[_PPID])
        start_time = int(f[_STARTTIME])
        pf_kthread = bool(int(f[_FLAGS]) & PF_KTHREAD)
        # ppid 2 also covers usermode helpers (modprobe, core dump pipes): user processes
        # the kernel started, kept out of dbguard's hands all the same.
        kernel_thread = pf_kthread or ppid == KTHREADD_PID or pid == KTHREADD_PID
        if pf_kthread:
            # No user memory, no exe, no cmdline, root cgroup: nothing more worth a read.
            return Proc(pid=pid, start_time=start_time, ppid=ppid, uid=0, comm=comm, exe="",
                        cmdline="", rss_bytes=0, memcg="/", oom_score_adj=0, kernel_thread=True)
        status = _read("status", dir_fd=d)
        uid, vm_rss, _ = parse_status(status)
        oom_score_adj = int(_read("oom_score_adj", dir_fd=d))
    except _GONE:
        return None
    # The memory, command line and executable belong to the address space, which any live
    # thread shows; the leader's own files go empty once its thread exits (pthread_exit).
    live = _live_thread(d, pid) if vm_rss is None else None
    t = live[0] if live else None
    try:
        if t is not None:
            vm_rss = parse_status(_read("status", dir_fd=t))[1]
        # Zombies and exiting processes have no VmRSS; stat's rss field is the same count in pages.
        rss = vm_rss if vm_rss is not None else int(f[_RSS]) * PAGE_SIZE
        at = d if t is None else t
        memcg, _ = parse_memcg(_read("cgroup", dir_fd=at))
        cmdline = parse_cmdline(_read("cmdline", 4 * CMDLINE_MAX, dir_fd=at))
        exe = read_exe(at)
    except _GONE:
        return None
    finally:
        if t is not None:
            os.close(t)
    # Interned: a host's processes share a few executables, cgroups and names (500 backends,
    # one postgres), and the table holds every process.
    return Proc(pid=pid, start_time=_share(start_time), ppid=_share(ppid), uid=_share(uid), comm=intern(comm),
                exe=intern(exe), cmdline=intern(cmdline), rss_bytes=_share(rss), memcg=intern(memcg),
                oom_score_adj=oom_score_adj, kernel_thread=kernel_thread)


def reread(old: Proc, root: str = "/proc") -> Proc | None:
    """`old` read again for what changes while a process runs one program: its memory, score
    and owner (stat, status, oom_score_adj: half the reads of read_proc, and no cgroup, cmdline
    or exe, which change only at an exec or a move the caller watches for). `old` itself when
    nothing changed, so what rests on it is not worked out again; a copy with the new facts;
    None when it must be read in full: gone, another process on its pid, its parent or name
    changed (an exec renames), its main thread exited (the memory is another thread's)."""
    try:
        d = os.open(f"{root}/{old.pid}", _O_READ | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        comm, f = parse_stat(_read("stat", dir_fd=d))
        if int(f[_STARTTIME]) != old.start_time or int(f[_PPID]) != old.ppid or comm != old.comm:
            return None
        uid, rss, _ = parse_status(_read("status", dir_fd=d))
        adj = int(_read("oom_score_adj", dir_fd=d))
    except _GONE:
        return None
    finally:
        os.close(d)
    if rss is None:
        return None
    if rss == old.rss_bytes and adj == old.oom_score_adj and uid == old.uid:
        return old
    return Proc(pid=old.pid, start_time=old.start_time, ppid=old.ppid, uid=_share(uid), comm=old.comm, exe=old.exe,
                cmdline=old.cmdline, rss_bytes=_share(rss), memcg=old.memcg, oom_score_adj=adj,
                kernel_thread=old.kernel_thread)


def _live_thread(d: int, pid: int) -> tuple[int, int] | None:
    """(dir fd on /proc/PID/task/TID, TID) of a thread that still has the process's memory,
    when the leader (pid) has exited and others live on; None when there is none."""
    try:
        tasks = os.open("task", _O_READ | os.O_DIRECTORY, dir_fd=d)
    except OSError:
        return None
    try:
        for name in os.listdir(tasks):
            if name == str(pid) or not name.isdigit():
                continue
            try:
                t = os.open(name, _O_READ | os.O_DIRECTORY, dir_fd=tasks)
            except OSError:
                continue
            try:
                if parse_status(_read("status", dir_fd=t))[1] is not None:
                    return t, int(name)
            except (OSError, ValueError, IndexError):
                pass
            os.close(t)
        return None
    finally:
        os.close(tasks)


DELETED = " (deleted)"


def read_exe(d: int) -> str:
    """The executable of the process (or thread) whose /proc directory `d` holds open, as
    the path it was started from: a binary replaced on disk since (a package upgrade) reads
    "PATH (deleted)" in /proc and is given as PATH, so rules about PATH still hold for it.
    "" when gone or not ours to see."""
    try:
        exe = os.readlink("exe", dir_fd=d)
    except OSError:
        return ""
    if exe.endswith(DELETED):
        try:
            running = os.stat("exe", dir_fd=d)
            on_disk = os.stat(exe)
            literal = (running.st_dev, running.st_ino) == (on_disk.st_dev, on_disk.st_ino)
        except OSError:
            literal = False
        if not literal:       # not a file really named "... (deleted)"
            exe = exe[:-len(DELETED)]
    return exe


def read_procs(root: str = "/proc") -> dict[int, Proc]:
    """Every process under `root` (threads are not listed there, only thread-group leaders)."""
    procs: dict[int, Proc] = {}
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        proc = read_proc(int(name), root)
        if proc is not None:
            procs[proc.pid] = proc
    return procs


def read_pss(proc: Proc, root: str = "/proc") -> int | None:
    """PSS in bytes of `proc`, None when it cannot be read: gone, its pid reused by another
    process since the sample, or not ours to read (smaps_rollup needs ptrace-read access)."""
    try:
        d = os.open(f"{root}/{proc.pid}", _O_READ | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        if start_time_at(d) != proc.start_time:
            return None
        try:
            return parse_pss(_read("smaps_rollup", dir_fd=d))
        except ProcessLookupError:  # the leader has exited; a live thread shows the memory
            return _thread_pss(d, proc.pid, root)
    except (OSError, ValueError, IndexError):      # ENOENT/ESRCH: exited; EACCES/EPERM: not ours
        return None
    finally:
        os.close(d)


def _thread_pss(d: int, pid: int, root: str) -> int | None:
    """PSS through a live thread: task/TID has no smaps_rollup, /proc/TID (not listed, there
    all the same) has, checked to be a thread of `pid` through the handle it is read by."""
    t = _live_thread(d, pid)
    if t is None:
        return None
    tid = t[1]
    os.close(t[0])
    td = os.open(f"{root}/{tid}", _O_READ | os.O_DIRECTORY)
    try:
        if _status_field(_read("status", dir_fd=td), b"\nTgid:") != pid:
            return None
        return parse_pss(_read("smaps_rollup", dir_fd=td))
    finally:
        os.close(td)


def start_time(pid: int, root: str = "/proc") -> int | None:
    try:
        return int(parse_stat(_read(f"{root}/{pid}/stat"))[1][_STARTTIME])
    except _GONE:
        return None


def live_start_time(pid: int, root: str = "/proc") -> int | None:
    """Start time of `pid` while it runs; None when it is gone or a zombie (exited, not reaped)."""
    try:
        fields = parse_stat(_read(f"{root}/{pid}/stat"))[1]
        return None if fields[_STATE] in (b"Z", b"X") else int(fields[_STARTTIME])
    except _GONE:
        return None


def start_time_at(dir_fd: int) -> int | None:
    """Start time of the process whose /proc/PID directory `dir_fd` holds open (None: gone)."""
    try:
        return int(parse_stat(_read("stat", dir_fd=dir_fd))[1][_STARTTIME])
    except _GONE:
        return None


def same_process(key: ProcKey, root: str = "/proc") -> bool:
    """True while `key.pid` is still the process we saw (not a newcomer that reused the pid)."""
    return start_time(key.pid, root) == key.start_time


def rss_anon(pid: int, root: str = "/proc") -> int:
    """Anonymous resident memory in bytes: what killing the process gives back for sure. 0 if gone."""
    try:
        d = os.open(f"{root}/{pid}", _O_READ | os.O_DIRECTORY)
    except OSError:
        return 0
    try:
        _, _, anon = parse_status(_read("status", dir_fd=d))
        live = _live_thread(d, pid) if anon is None else None
        if live is not None:        # the leader has exited: a live thread shows the memory
            try:
                anon = parse_status(_read("status", dir_fd=live[0]))[2]
            finally:
                os.close(live[0])
    except _GONE:
        return 0
    finally:
        os.close(d)
    return anon or 0


def memcg_dir(path: str, version: int, cgroup_root: str = CGROUP_ROOT) -> str:
    """The directory of a memory cgroup given its /proc/PID/cgroup path and version."""
    if version == 1:
        base = f"{cgroup_root}/memory"
    elif os.path.exists(f"{cgroup_root}/cgroup.controllers"):
        base = cgroup_root                    # unified layout
    else:
        base = f"{cgroup_root}/unified"       # hybrid layout without a v1 memory controller
    return base + "/" + path.strip("/") if path.strip("/") else base


def own_memcg_dir(pid: int, root: str = "/proc") -> str:
    """Directory under /sys/fs/cgroup of the memory cgroup `pid` lives in."""
    try:
        path, version = parse_memcg(_read(f"{root}/{pid}/cgroup"))
    except (FileNotFoundError, ProcessLookupError):
        raise DbguardError(f"process {pid} does not exist; cannot find its memory cgroup") from None
    if version == 0:
        raise DbguardError(f"process {pid} is in no memory cgroup; mount the cgroup v1 memory "
                           "controller or cgroup v2, or set pressure.cgroup")
    return memcg_dir(path, version)
