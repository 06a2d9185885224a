"""dbguard.metrics over real HTTP: start Metrics on a free port, feed it model objects, scrape."""
from __future__ import annotations

import json
import platform
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbguard.errors import DbguardError
from dbguard.metrics import Metrics
from dbguard.model import (Action, ActionKind, CacheStats, DbSession, DbStats, Level, MemoryReading, Outcome, Proc, Role,
                           Snapshot)

MiB = 1024**2


def _proc(pid: int, comm: str) -> Proc:
    return Proc(pid=pid, start_time=100 + pid, ppid=1, uid=0, comm=comm, exe=f"/usr/bin/{comm}",
                cmdline=comm, rss_bytes=10 * MiB, memcg="/test", oom_score_adj=0)


def make_snapshot(*, pg_up: bool = True, cgroup: str = "/sys/fs/cgroup/memory/test") -> Snapshot:
    roles = {1: Role.INIT, 10: Role.POSTMASTER, 11: Role.PG_AUXILIARY, 12: Role.PG_AUXILIARY,
             13: Role.PG_BACKEND, 20: Role.MYSQLD, 30: Role.DBGUARD, 40: Role.OTHER, 41: Role.OTHER}
    procs = {pid: _proc(pid, role.value) for pid, role in roles.items()}
    pg = DbStats(name="main", kind="postgresql", up=pg_up, server_pid=10,
                 sessions=(DbSession(pid=13, kind="client backend", state="active"),),
                 cache_bytes=500 * MiB, cache_configured_bytes=500 * MiB, cache_used_bytes=120 * MiB,
                 hit_ratio=0.97, shrink_step=0, shrink_steps_max=3)
    my = DbStats(name="orders", kind="mysql", up=True, server_pid=20,
                 cache_bytes=256 * MiB, cache_configured_bytes=1024 * MiB, cache_used_bytes=200 * MiB,
                 hit_ratio=None, shrink_step=2, shrink_steps_max=4)
    mem = MemoryReading(cgroup=cgroup, cgroup_version=1, usage_bytes=900 * MiB, limit_bytes=1000 * MiB,
                        psi_some_avg10=12.5, psi_full_avg10=3.0, reclaimable_bytes=100 * MiB)
    caches = (CacheStats(name="app", kind="redis", up=True, server_pid=50, memory=200 * MiB, limit=192 * MiB,
                         configured=256 * MiB, shrink_step=1, shrink_steps_max=3, evictions=17, hit_ratio=0.9),
              CacheStats(name="gone", kind="memcached", up=False, error="down"),
              CacheStats(name="pgb", kind="pgbouncer", up=True, pooler=True, unit="connections", memory=6, limit=6,
                         configured=8, shrink_step=1, shrink_steps_max=3, extra={"clients_waiting": 2}))
    return Snapshot(ts=1_700_000_000.0, memory=mem, procs=procs, roles=roles, databases=(pg, my), self_pid=30,
                    caches=caches)


def feed_everything(m: Metrics) -> None:
    """One of every observation the daemon makes, so every metric family has samples."""
    for source in ("pressure", "procfs", "database:main", "bpf"):
        m.observe_collector(source, source != "bpf", 0.004)
    m.observe_snapshot(make_snapshot(), Level.HIGH)
    for kind in ActionKind:
        m.observe_action(Action(kind=kind, reason="test", pid=40), Outcome.done())
    m.observe_action(Action(kind=ActionKind.KILL, reason="test", pid=41), Outcome.failed("EPERM"))
    m.observe_action(Action(kind=ActionKind.KILL, reason="test", pid=41, dry_run=True), Outcome.dry_run())
    m.observe_kernel_event("oom_kill")
    m.observe_kernel_event("oom_kill", breach=True)
    m.observe_kernel_event("bpf_kill")
    m.observe_kernel_event("score_tamper", breach=True)
    m.set_protection(bpf=True, lower_scores=False, raise_scores=True, kill=True)


def exported_names(text: str) -> set[str]:
    """Every sample name in an exposition (with _total, _bucket, ... suffixes as scraped)."""
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture
def served():
    m = Metrics("127.0.0.1:0")
    try:
        host, port = m.address
        yield m, f"http://{host}:{port}"
    finally:
        m.close()


def test_scrape_over_http_has_every_family_with_fed_values(served):
    m, base = served
    feed_everything(m)
    status, ctype, text = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    s = samples(text)
    pg = (("database", "main"), ("kind", "postgresql"))
    my = (("database", "orders"), ("kind", "mysql"))
    cg = (("cgroup", "/sys/fs/cgroup/memory/test"),)
    assert s[("dbguard_pressure_level", ())] == 2
    assert s[("dbguard_cycles_total", ())] == 1                                 # one snapshot observed
    assert s[("dbguard_memory_usage_bytes", cg)] == 900 * MiB
    assert s[("dbguard_memory_limit_bytes", cg)] == 1000 * MiB
    assert s[("dbguard_memory_unreclaimable_ratio", cg)] == pytest.approx(0.8)      # page cache does not count
    assert s[("dbguard_psi_some_avg10_ratio", cg)] == pytest.approx(0.125)  # percent -> ratio
    assert s[("dbguard_psi_full_avg10_ratio", cg)] == pytest.approx(0.03)
    assert s[("dbguard_database_cache_bytes", pg)] == 500 * MiB
    assert s[("dbguard_database_cache_used_bytes", pg)] == 120 * MiB
    assert s[("dbguard_database_cache_hit_ratio", pg)] == pytest.approx(0.97)
    assert ("dbguard_database_cache_hit_ratio", my) not in s                # unknown is absent, not 0
    assert s[("dbguard_database_shrink_step", my)] == 2
    assert s[("dbguard_database_cache_configured_bytes", my)] == 1024 * MiB
    assert s[("dbguard_database_up", pg)] == 1
    assert s[("dbguard_shielded_processes", (("role", "pg_auxiliary"),))] == 2
    assert s[("dbguard_shielded_processes", (("role", "postmaster"),))] == 1
    assert s[("dbguard_shielded_processes", (("role", "mysqld"),))] == 1
    assert ("dbguard_shielded_processes", (("role", "other"),)) not in s
    assert s[("dbguard_collector_success", (("source", "bpf"),))] == 0
    assert s[("dbguard_collector_success", (("source", "database:main"),))] == 1
    assert s[("dbguard_collector_duration_seconds", (("source", "procfs"),))] == pytest.approx(0.004)
    assert s[("dbguard_actions_total", (("kind", "kill"), ("outcome", "done")))] == 1
    assert s[("dbguard_actions_total", (("kind", "kill"), ("outcome", "failed")))] == 1
    assert s[("dbguard_actions_total", (("kind", "kill"), ("outcome", "dry_run")))] == 1
    assert s[("dbguard_actions_total", (("kind", "shrink_cache"), ("outcome", "done")))] == 1
    assert s[("dbguard_kernel_oom_kills_total", ())] == 2
    assert s[("dbguard_bpf_kills_total", ())] == 1
    assert s[("dbguard_protection_breaches_total", (("kind", "oom_kill"),))] == 1
    assert s[("dbguard_protection_breaches_total", (("kind", "score_tamper"),))] == 1
    assert s[("dbguard_kernel_events_total", (("kind", "score_tamper"),))] == 1
    assert s[("dbguard_protection_active", (("mechanism", "bpf"),))] == 1
    assert s[("dbguard_protection_active", (("mechanism", "lower_scores"),))] == 0
    assert s[("dbguard_last_snapshot_timestamp_seconds", ())] == 1_700_000_000.0
    info = [k for k in s if k[0] == "dbguard_build_info"]
    assert len(info) == 1 and dict(info[0][1])["version"]
    assert dict(info[0][1])["python"] == platform.python_version()     # what metrics.py gets without platform
    # one prefix for everything dbguard exports
    assert all(name.startswith("dbguard_") for name in exported_names(text))
    assert text == m.render().decode()


def test_stale_database_keeps_up_and_step_but_drops_figures(served):
    m, base = served
    m.observe_snapshot(make_snapshot(), Level.OK)
    m.observe_snapshot(make_snapshot(pg_up=False, cgroup=""), Level.WARN)
    s = samples(get(base + "/metrics")[2])
    pg = (("database", "main"), ("kind", "postgresql"))
    assert s[("dbguard_database_up", pg)] == 0
    assert ("dbguard_database_cache_bytes", pg) not in s
    # the cgroup label follows the latest snapshot; the old one is gone
    assert s[("dbguard_memory_usage_bytes", (("cgroup", "host"),))] == 900 * MiB
    assert not any(dict(k[1]).get("cgroup") == "/sys/fs/cgroup/memory/test" for k in s)


def test_each_scope_has_its_level_and_memory_and_each_database_its_scope(served):
    import dataclasses
    m, base = served
    a = make_snapshot(cgroup="/sys/fs/cgroup/memory/kubepods/pod-a")
    b = make_snapshot(cgroup="/sys/fs/cgroup/memory/kubepods/pod-b")
    a = dataclasses.replace(a, databases=a.databases[:1], caches=())
    b = dataclasses.replace(b, databases=b.databases[1:], caches=(), memory=dataclasses.replace(b.memory, usage_bytes=1))
    m.observe_scopes([(a, Level.HIGH), (b, Level.OK)])
    s = samples(get(base + "/metrics")[2])
    pod_a, pod_b = (("cgroup", a.memory.cgroup),), (("cgroup", b.memory.cgroup),)
    assert s[("dbguard_pressure_level", ())] == 2, "the highest of the scopes"
    assert (s[("dbguard_scope_pressure_level", pod_a)], s[("dbguard_scope_pressure_level", pod_b)]) == (2, 0)
    assert (s[("dbguard_memory_usage_bytes", pod_a)], s[("dbguard_memory_usage_bytes", pod_b)]) == (900 * MiB, 1)
    assert s[("dbguard_database_scope", (("cgroup", a.memory.cgroup), ("database", "main"), ("kind", "postgresql")))] == 1
    assert s[("dbguard_database_scope", (("cgroup", b.memory.cgroup), ("database", "orders"), ("kind", "mysql")))] == 1
    assert not any(k[0] == "dbguard_database_scope" and dict(k[1])["database"] == "main"
                   and dict(k[1])["cgroup"] == b.memory.cgroup for k in s)


def test_healthz_follows_protection_state(served):
    m, base = served
    status, ctype, body = get(base + "/healthz")
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["protection_active"] is False
    m.set_protection(bpf=False, lower_scores=False, raise_scores=True, kill=False)
    status, _, body = get(base + "/healthz")
    doc = json.loads(body)
    assert status == 200 and doc["protection_active"] is True
    assert doc["protection"] == {"bpf": False, "lower_scores": False, "raise_scores": True, "kill": False}
    assert get(base + "/nothing")[0] == 404


def test_healthz_uses_the_daemons_check():
    verdict = {"ok": True}
    m = Metrics("127.0.0.1:0", healthy=lambda: (verdict["ok"], "loop alive" if verdict["ok"] else "loop stalled"))
    try:
        url = "http://%s:%d/healthz" % m.address
        status, _, body = get(url)
        assert status == 200 and json.loads(body)["detail"] == "loop alive"
        verdict["ok"] = False
        status, _, body = get(url)
        doc = json.loads(body)
        assert status == 503 and doc["protection_active"] is False and doc["detail"] == "loop stalled"
    finally:
        m.close()


def test_private_registries_do_not_share_state():
    a, b = Metrics(""), Metrics("")
    a.observe_kernel_event("oom_kill")
    assert samples(a.render().decode())[("dbguard_kernel_oom_kills_total", ())] == 1
    assert samples(b.render().decode())[("dbguard_kernel_oom_kills_total", ())] == 0
    assert a.address is None


def test_address_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DbguardError) as e:
            Metrics(f"127.0.0.1:{port}")
    msg = str(e.value)
    assert "\n" not in msg and "metrics.listen" in msg and str(port) in msg


def test_bad_listen_string_is_a_one_line_error():
    with pytest.raises(DbguardError, match=r"metrics.listen: expected HOST:PORT"):
        Metrics("localhost")


def test_close_frees_the_port():
    m = Metrics("127.0.0.1:0")
    host, port = m.address
    m.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))   # would raise EADDRINUSE if the server still held it


def test_audit_write_errors_are_counted_by_kind(served):
    m, base = served
    m.observe_audit_error("ENOSPC")
    m.observe_audit_error("ENOSPC")
    m.observe_audit_error("EFBIG")
    s = samples(get(base + "/metrics")[2])
    assert s[("dbguard_audit_write_errors_total", (("error", "ENOSPC"),))] == 2
    assert s[("dbguard_audit_write_errors_total", (("error", "EFBIG"),))] == 1


def _threads() -> int:
    import os
    return len(os.listdir("/proc/self/task"))


def test_idle_connections_neither_grow_threads_nor_block_a_scrape(served):
    """Was: a thread per connection, no timeout. Here 500 silent connections (and 50 that
    send half a request) are held open while scrapes are served."""
    m, base = served
    feed_everything(m)
    before = _threads()
    idle = []
    try:
        for i in range(550):
            s = socket.create_connection(m.address, timeout=5)
            if i % 11 == 0:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")    # and never the blank line
            idle.append(s)
        import time
        t0 = time.monotonic()
        status, _, text = get(base + "/metrics")
        assert status == 200 and "dbguard_pressure_level 2.0" in text
        assert get(base + "/healthz")[0] in (200, 503)
        assert time.monotonic() - t0 < 5
        assert _threads() <= before, f"threads grew from {before} to {_threads()}"
    finally:
        for s in idle:
            s.close()


def test_bad_requests_get_a_status_not_a_hang(served):
    m, _ = served
    for request, status in ((b"POST /metrics HTTP/1.1\r\n\r\n", b"405"), (b"nonsense\r\n\r\n", b"405"),
                            (b"GET /" + b"x" * 9000, b"431"), (b"HEAD /metrics HTTP/1.0\r\n\r\n", b"200")):
        with socket.create_connection(m.address, timeout=5) as s:
            s.sendall(request)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.split(b" ", 2)[1] == status, reply[:200]
        if request.startswith(b"HEAD"):
            assert reply.endswith(b"\r\n\r\n"), "HEAD has no body"


def test_idle_connections_are_closed_after_the_timeout():
    from dbguard.serve import HttpServer
    server = HttpServer("127.0.0.1", 0, lambda path: (200, "text/plain", b"ok\n"), idle_timeout=0.5,
                        max_connections=4)
    try:
        conns = [socket.create_connection(server.address, timeout=5) for _ in range(6)]
        # past max_connections the longest idle are closed for the newcomers: 2 of the 6 at once
        import time
        time.sleep(0.3)
        for c in conns:
            c.settimeout(3)
        closed = [c.recv(1) == b"" for c in conns]      # EOF once the server drops them (timeout 0.5 s)
        assert all(closed)
        with socket.create_connection(server.address, timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 200 OK")
    finally:
        for c in conns:
            c.close()
        server.close()


def test_caches_and_poolers_are_exported_and_a_cache_that_is_down_has_no_figures(served):
    m, url = served
    m.observe_snapshot(make_snapshot(), Level.WARN)
    s = samples(get(url + "/metrics")[2])
    app = (("cache", "app"), ("kind", "redis"))
    assert s[("dbguard_cache_limit_bytes", app)] == 192 * MiB
    assert s[("dbguard_cache_configured_limit_bytes", app)] == 256 * MiB
    assert s[("dbguard_cache_shrink_step", app)] == 1 and s[("dbguard_cache_evictions", app)] == 17
    gone = (("cache", "gone"), ("kind", "memcached"))
    assert s[("dbguard_cache_up", gone)] == 0 and ("dbguard_cache_limit_bytes", gone) not in s
    pgb = (("kind", "pgbouncer"), ("pooler", "pgb"))
    assert s[("dbguard_pooler_pool_size", pgb)] == 6 and s[("dbguard_pooler_configured_pool_size", pgb)] == 8
    assert s[("dbguard_pooler_clients_waiting", pgb)] == 2
