"""Suite-wide rules and fixtures. A test that needs root, a database or a memory cgroup and
cannot have it FAILS with one line naming what is missing (lab.require); it never skips.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from dbguard.errors import DbguardError
from lab import require
from lab.cgroup import MemoryCgroup
from lab.procs import Processes


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("needs root (memory cgroups, BPF, starting databases): run the suite as root, "
                    "e.g. sudo make test", pytrace=False)


def needs(check: Callable[[], None]) -> None:
    """Run a lab.require check; its one line is the test's failure."""
    try:
        check()
    except DbguardError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def postgresql_host() -> None:
    """Root and PostgreSQL 15's server binaries, for lab.pgcluster.PgCluster."""
    needs(require.postgresql)


@pytest.fixture(scope="session")
def mariadb_host() -> None:
    """Root and the MariaDB server, for lab.mariadb.MariaDB."""
    needs(require.mariadb)


@pytest.fixture(scope="session")
def redis_host() -> None:
    """Root and redis-server, for lab.redis.RedisServer."""
    from lab.redis import require as redis_required
    needs(redis_required)


@pytest.fixture(scope="session")
def memcached_host() -> None:
    """Root and memcached, for lab.memcached.Memcached."""
    from lab.memcached import require as memcached_required
    needs(memcached_required)


@pytest.fixture(scope="session")
def pgbouncer_host() -> None:
    """Root, PostgreSQL 15 and pgbouncer, for lab.pgbouncer.PgBouncer."""
    from lab.pgbouncer import require as pgbouncer_required
    needs(require.postgresql)
    needs(pgbouncer_required)


@pytest.fixture(scope="session")
def scenario_host() -> None:
    """What lab.scenario needs: root, memory cgroups, PostgreSQL 15 and pgbench."""
    from lab.scenario import require_lab
    needs(require_lab)


@pytest.fixture
def make_cgroup() -> Iterator[Callable[[int], MemoryCgroup]]:
    """make_cgroup(limit_bytes): a memory cgroup under the suite's own, removed (with whatever
    is left in it) at the end of the test."""
    made: list[MemoryCgroup] = []

    def make(limit_bytes: int) -> MemoryCgroup:
        needs(require.memory_cgroups)
        cg = MemoryCgroup(limit_bytes)
        try:
            made.append(cg.__enter__())
        except (OSError, RuntimeError) as e:
            pytest.fail(f"cannot make a test memory cgroup: {e}", pytrace=False)
        return cg
    try:
        yield make
    finally:
        for cg in reversed(made):
            cg.remove()


@pytest.fixture
def procs() -> Iterator[Processes]:
    """The test's child processes: all killed and reaped at its end, whatever happens."""
    with Processes() as ps:
        yield ps
