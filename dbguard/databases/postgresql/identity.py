"""The postmaster of a data directory, by fact: postmaster.pid names it and it runs there."""
from __future__ import annotations

import os

from .. import identity


def postmaster_pid(data_directory: str) -> int | None:
    """The live postmaster of `data_directory`; None if the file is absent or stale.

    A stale file left by a crash names a pid that is gone or runs elsewhere: None, never a pid
    that may have been reused. When /proc/PID/cwd is not ours to check (not root), the file is
    the best fact left.
    """
    if not data_directory:
        return None
    pid, _why = identity.server_pid(os.path.join(data_directory, "postmaster.pid"), data_directory,
                                    trust_unreadable=True)
    return pid
