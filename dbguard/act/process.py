"""Signals and oom_score_adj writes that cannot hit a process that merely reused a pid.

A kill opens a pidfd first and then checks the start time: if it matches, the pidfd is the
process policy chose, whatever happens to the pid afterwards. A score write goes through a
/proc/PID directory fd checked the same way.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal

from ..model import Outcome, ProcKey
from ..sense.procfs import start_time_at

# process_mrelease(2) has the same number on every architecture (generic syscall table).
SYS_PROCESS_MRELEASE = 448
_libc = ctypes.CDLL(None, use_errno=True)


class Refused(Exception):
    """The safety rules forbid this action; the message says which."""


def check_killable(pid: int) -> None:
    if pid <= 1:
        raise Refused(f"pid {pid}: never PID 1 or below")
    if pid == os.getpid():
        raise Refused("never dbguard itself")


def _mrelease(pidfd: int) -> int:
    """process_mrelease(2) on `pidfd`: 0, or the errno."""
    if _libc.syscall(SYS_PROCESS_MRELEASE, pidfd, 0) == 0:
        return 0
    return ctypes.get_errno()


# Why process_mrelease gave nothing back, by errno (the kill itself stands either way).
NOT_RELEASED = {errno.ESRCH: "its exit had already let go of its memory",
                errno.EINVAL: "it was not dying",
                errno.EAGAIN: "part of its memory could not be reaped without blocking",
                errno.ENOSYS: "this kernel has no process_mrelease (Linux 5.15 or later)"}


def _release_memory(pidfd: int) -> tuple[bool, str]:
    """Reap a SIGKILLed process's memory now instead of when it gets to run its exit:
    (released, why not). EAGAIN (a range that could not be reaped without blocking at that
    instant) is worth one more try."""
    err = _mrelease(pidfd)
    if err == errno.EAGAIN:
        err = _mrelease(pidfd)
    return err == 0, NOT_RELEASED.get(err, os.strerror(err))


def _pidfd(key: ProcKey) -> tuple[int | None, str]:
    """A pidfd for the process `key` names, or None and why not (gone, or its pid reused). The
    start time is checked once the pidfd is open: from then on the pidfd is that process,
    whatever becomes of its pid."""
    try:
        pidfd = os.pidfd_open(key.pid)
    except ProcessLookupError:
        return None, "gone"
    try:
        dir_fd = os.open(f"/proc/{key.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(pidfd)
        return None, "gone"
    try:
        if start_time_at(dir_fd) != key.start_time:
            os.close(pidfd)
            return None, "the pid now belongs to another process"
        return pidfd, ""
    finally:
        os.close(dir_fd)


def release(key: ProcKey) -> tuple[bool, str]:
    """Reap now the memory of the process `key` names, which someone else SIGKILLed (the BPF
    program): its pages leave the cgroup at once instead of when its exit gets to them, a
    window in which the kernel's OOM killer, which waits only for victims of its own, would
    choose another process. (released, why not)."""
    pidfd, why = _pidfd(key)
    if pidfd is None:
        return False, "it had exited" if why == "gone" else why
    try:
        return _release_memory(pidfd)
    finally:
        os.close(pidfd)


def kill(key: ProcKey) -> Outcome:
    """SIGKILL the process `key` names, then release its memory."""
    check_killable(key.pid)
    pidfd, why = _pidfd(key)
    if pidfd is None:
        return Outcome.gone("gone before the kill" if why == "gone" else f"not killed: {why}")
    try:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return Outcome.gone("exited before the kill")
        released, why = _release_memory(pidfd)
        return Outcome.done("killed (SIGKILL via pidfd; " +
                            ("memory released at once)" if released else f"memory not released: {why})"))
    finally:
        os.close(pidfd)


def set_oom_score_adj(key: ProcKey, value: int) -> Outcome:
    try:
        dir_fd = os.open(f"/proc/{key.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Outcome.gone("gone")
    try:
        if start_time_at(dir_fd) != key.start_time:
            return Outcome.gone("not changed: the pid now belongs to another process")
        try:
            fd = os.open("oom_score_adj", os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return Outcome.gone("gone")
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            if e.errno == errno.EACCES and value < 0:
                return Outcome.refused("the kernel refused to lower oom_score_adj: dbguard lacks CAP_SYS_RESOURCE")
            if e.errno == errno.ESRCH:
                return Outcome.gone("gone")
            raise
        finally:
            os.close(fd)
        return Outcome.done(f"oom_score_adj set to {value}")
    finally:
        os.close(dir_fd)
