"""What the end-to-end tests of application caches share: PostgreSQL with a read load, a cache
server and hogs in one memory cgroup (tests/e2e/test_redis_pressure.py, test_memcached_pressure.py).

    reads = PgReads(pg).start()                  # range reads, errors kept
    hogs = start_hogs(procs, cg)                 # three 110 MiB hogs, one a second
    wait_for(lambda: ..., 30, "a lower limit", diag)
    story(daemon, "more lines")                  # the audit (not the oom_score_adj lines) + output
"""
from __future__ import annotations

import subprocess
import threading
import time
from typing import Callable

import psycopg

from lab import hog
from lab.cgroup import MemoryCgroup
from lab.launcher import DbguardRun, audit_names, audit_records, base_config

MiB = 1024**2
HOG = 110 * MiB


class PgReads(threading.Thread):
    """Range reads over pgbench_accounts on one connection: queries counted, errors kept."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn, self.ok, self.errors = dsn, 0, []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                i = 0
                while not self.done.is_set():
                    conn.execute("SELECT sum(abalance) FROM pgbench_accounts WHERE aid BETWEEN %s AND %s",
                                 (i % 500_000, i % 500_000 + 2000)).fetchone()
                    self.ok += 1
                    i += 7919
                    time.sleep(0.01)
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}"[:300])


class Sampler(threading.Thread):
    """read() every 0.2 s into `seen` (a reading that fails is skipped): the oracle of a limit's moves."""

    def __init__(self, read: Callable[[], object]):
        super().__init__(daemon=True)
        self.read, self.seen = read, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.seen.append(self.read())
            except Exception:
                pass


def start_hogs(procs, cg: MemoryCgroup, n: int = 3) -> list:
    out = []
    for _ in range(n):
        out.append(procs.add(hog.spawn(HOG, 5 * MiB, 0.1, hold=600, preexec_fn=cg.preexec(),
                                       stdout=subprocess.DEVNULL)))
        time.sleep(1.0)
    return out


def end_hogs(hogs: list) -> None:
    """Our own children: the pressure passes."""
    for h in hogs:
        if h.poll() is None:
            h.kill()
        h.wait()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, diag: Callable[[], str] = lambda: "") -> None:
    import pytest            # for tests only; lab stays importable without it
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s\n{diag()}")
        time.sleep(0.1)


def story(daemon: DbguardRun, *more: str) -> str:
    """The audit (without the oom_score_adj lines), `more`, and dbguard's output: for failures."""
    rows = [f"{x.get('action')} {x.get('target')} {x.get('level')}: {x.get('result')}"
            for x in audit_records(daemon.audit_path) if x.get("action") != "set_oom_score_adj"]
    return "audit:\n  " + "\n  ".join(rows[-40:]) + "".join(f"\n{m}" for m in more) + \
        f"\ndbguard output:\n{daemon.output(2000)}"


def assert_kept(told: str, audit: list[dict], *, running: bool, oom_kills: int, cache: str, server, pg,
                postmaster: int) -> list[dict]:
    """What the cache tests assert of protection: dbguard ran on, the kernel never struck, neither
    the cache `server` (a lab server: pid, running()) nor PostgreSQL died or was named by a kill,
    and every shrink of `cache` succeeded on the user path before any kill. Its shrinks."""
    from lab.pgoutput import count_crash_recoveries
    from lab.procs import alive
    assert running, f"dbguard exited\n{told}"
    assert oom_kills == 0, f"the kernel OOM killer struck {oom_kills} time(s)\n{told}"
    assert server.running(), f"the cache server was killed\n{told}"
    assert alive(postmaster) and count_crash_recoveries(pg.log()) == 0, f"PostgreSQL crashed\n{told}"
    kills = [x for x in audit if "kill" in str(x.get("action"))]
    assert not any(audit_names(x, server.pid) or audit_names(x, postmaster) for x in kills), \
        f"a kill names the cache server or the postmaster\n{told}"
    shrinks = [x for x in audit if x.get("action") == "shrink_cache" and x.get("cache") == cache]
    assert shrinks and all(x["ok"] and x["path"] == "user" for x in shrinks), told
    if kills:
        assert float(shrinks[0]["ts"]) < min(float(x["ts"]) for x in kills), f"a kill before the shrink\n{told}"
    assert any(x.get("action") in ("grow_cache", "restore_cache") and x.get("cache") == cache for x in audit), told
    return shrinks


def guard_config(workdir, cg: MemoryCgroup, pg_dsn: str, cache: dict) -> dict:
    """dbguard's config for PostgreSQL and one [[caches]] entry in `cg`: a 0.2 s cycle, 2 s dwell."""
    cfg = base_config(workdir, cg.path)
    cfg["general"]["interval"] = 0.2
    cfg["pressure"]["min_dwell"] = 2.0
    cfg["databases"] = [{"name": "pg", "kind": "postgresql", "dsn": pg_dsn}]
    cfg["caches"] = [cache]
    return cfg


def protecting(daemon: DbguardRun, diag: Callable[[], str], settle: float = 2.0) -> None:
    """Until dbguard protects (the test fails with diag() when it does not)."""
    import pytest
    from dbguard.errors import DbguardError
    try:
        daemon.wait_protecting(settle=settle)
    except DbguardError as e:
        pytest.fail(f"{e}\n{diag()}")
