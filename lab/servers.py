"""What the throwaway servers of lab/ share (Redis, memcached, PgBouncer): started as their own
OS user and optionally in a memory cgroup, waited for until they answer, stopped and their
temp directory removed."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from .cgroup import MemoryCgroup


def spawn(argv: list[str], user: pwd.struct_passwd | None = None,
          cgroup: MemoryCgroup | None = None) -> subprocess.Popen:
    """argv as `user` (None: as we are), in `cgroup` (None: ours), output dropped."""
    join = cgroup.preexec() if cgroup is not None else None

    def preexec() -> None:
        if join is not None:
            join()
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
    return subprocess.Popen(argv, preexec_fn=preexec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_up(proc: subprocess.Popen, probe: Callable[[], object], timeout: float, what: str,
            errors: tuple[type[BaseException], ...] = (OSError,), log: Callable[[], str] = lambda: "") -> None:
    """Until probe() answers without one of `errors`; RuntimeError (with its log's tail) when
    the server exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except errors:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {log()[-1500:]}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen | None, directory: Path | None) -> None:
    """SIGTERM, SIGKILL after 10 s; then its directory removed."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
