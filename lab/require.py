"""What the lab needs from the host, checked up front: each check raises DbguardError with one
line naming what is missing and how to get it, so a test fails (never skips) saying so and
the demo and benchmarks stop before starting anything.
"""
from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from dbguard.errors import DbguardError
from lab.cgroup import own_memory_cgroup
from lab.pgcluster import OS_USER as PG_OS_USER, PG_BIN


def root(what: str) -> None:
    if os.geteuid() != 0:
        raise DbguardError(f"{what} needs root: run it as root (sudo make test, sudo make demo)")


def memory_cgroups() -> None:
    """Root, a memory cgroup controller, and our own memory cgroup writable (children go there)."""
    root("making memory cgroups")
    try:
        path, _ = own_memory_cgroup()
    except RuntimeError as e:
        raise DbguardError(f"no memory cgroup controller: {e}") from None
    if not os.access(path, os.W_OK):
        raise DbguardError(f"cannot create memory cgroups under {path}: not writable; run as root "
                           "with the cgroup filesystem mounted read-write")


def postgresql() -> None:
    """Root (initdb and the server run as the postgres OS user) and PostgreSQL 15's server."""
    root("a throwaway PostgreSQL (initdb and the server run as the postgres OS user)")
    if not (PG_BIN / "initdb").exists():
        raise DbguardError(f"PostgreSQL 15 server binaries missing in {PG_BIN}: apt-get install postgresql-15")
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise DbguardError(f"no {PG_OS_USER} OS user: apt-get install postgresql-15 creates it") from None


def pgbench() -> None:
    if shutil.which("pgbench") is None:
        raise DbguardError("pgbench not found: install postgresql-contrib (apt-get install postgresql)")


def mariadb() -> None:
    """Root (the server runs as the mysql OS user) and the MariaDB server."""
    from lab.mariadb import INSTALL_DB, SERVER     # imports PyMySQL: only when asked
    root("a throwaway MariaDB (the server runs as the mysql OS user)")
    if shutil.which(INSTALL_DB) is None or not Path(SERVER).exists():
        raise DbguardError("MariaDB not installed: apt-get install mariadb-server (or run `make setup`)")
