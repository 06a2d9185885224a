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


def release_memory(pidfd: int) -> bool:
    """Reap a SIGKILLed process's memory now instead of when it gets to run its exit."""
    return _libc.syscall(SYS_PROCESS_MRELEASE, pidfd, 0) == 0


def kill(key: ProcKey) -> Outcome:
    """SIGKILL the process `key` names, then release its memory."""
    check_killable(key.pid)
    try:
        pidfd = os.pidfd_open(key.pid)
    except ProcessLookupError:
        return Outcome.gone("gone before the kill")
    try:
        dir_fd = os.open(f"/proc/{key.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(pidfd)
        return Outcome.gone("gone before the kill")
    try:
        if start_time_at(dir_fd) != key.start_time:
            return Outcome.gone("not killed: the pid now belongs to another process")
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return Outcome.gone("exited before the kill")
        released = release_memory(pidfd)
        return Outcome.done("killed (SIGKILL via pidfd" + ("; memory released at once)" if released else ")"))
    finally:
        os.close(dir_fd)
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
