"""What an application cache or pooler gives back when dbguard steps it down, measured through
dbguard's own adapters against real servers (no memory cgroup, no hogs: the step alone).

    sudo .venv/bin/python -m benchmarks.giveback            # both, 3 runs each (~4 min; make bench too)
    sudo .venv/bin/python -m benchmarks.giveback memcached  # or: pgbouncer

memcached: a 256 MiB cache filled with 240 MiB of 20 kB values, stepped to its 64 MiB floor in
3 steps and back; per step the slab memory it holds (`stats slabs` total_malloced), its RSS
(/proc) and how long the step took.

pgbouncer: PostgreSQL behind a PgBouncer (transaction pooling, default_pool_size 8) with 10
clients each running a ~100 ms query back to back; the pool stepped to 2 in 3 steps, each
step waiting for the last to take effect, and back. Measured: errors, queries answered, how
long each step took to take effect (server connections at the new size, SHOW POOLS), and the
clients' latency: before, while the steps take effect, and steady at 2 (at a pool of 2 a client
waits its turn behind 4 others: that wait is the pool size, not the step).
Results: benchmarks/giveback-results.json and benchmarks/GIVEBACK-RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dbguard import config

from .record import Standalone, grouped, repeat
from .stats import median

HERE = Path(__file__).resolve().parent
MiB = 1024**2
QUERY = "SELECT count(*) FROM generate_series(1, 300000)"
POOL, FLOOR, CLIENTS = 8, 2, 10
# How the pool is lowered: dbguard's adapter, a step at a time as its policy paces it; the same
# three steps each with RECONNECT as soon as the last one's connections are down (no wait for
# logins); and SET alone, at once.
POOLER_WAYS = ("dbguard", "steps-unguarded", "set-only")


def memcached_run() -> dict:
    from dbguard.caches.memcached import Memcached as Adapter
    from lab.memcached import Memcached
    from lab.procs import rss
    with Memcached(limit_mib=256) as m, tempfile.TemporaryDirectory() as state:
        m.fill(240 * MiB)
        cfg = config.from_dict({"caches": [{"kind": "memcached", "name": "mc", "url": m.socket, "floor": 64 * MiB}]})
        a = Adapter(cfg.caches[0], state)
        rows = [{"step": 0, "limit_mib": m.stats()["limit_maxbytes"] // MiB,
                 "held_mib": m.stats("slabs")["total_malloced"] // MiB, "rss_mib": rss(m.pid) // MiB, "seconds": 0.0}]
        for step in (1, 2, 3, 2, 1, 0):
            t0 = time.monotonic()
            out = a.set_shrink_step(step)
            rows.append({"step": step, "limit_mib": m.stats()["limit_maxbytes"] // MiB,
                         "held_mib": m.stats("slabs")["total_malloced"] // MiB, "rss_mib": rss(m.pid) // MiB,
                         "seconds": round(time.monotonic() - t0, 3), "ok": out.ok, "detail": out.detail})
        return {"steps": rows}


def _servers(b) -> int:
    return sum(int(p[k]) for p in b.show("POOLS") if p["database"] == "app"
               for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


def _until(cond, timeout: float) -> float | None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.05)
    return round(time.monotonic() - t0, 2)


def pooler_run(pg, way: str) -> dict:
    from dbguard.caches.pgbouncer import PgBouncer as Adapter
    from lab.pgbouncer import Clients, PgBouncer
    with PgBouncer(pg, pool_size=POOL) as b, tempfile.TemporaryDirectory() as state, \
            Clients(b.dsn("app"), CLIENTS, QUERY) as clients:
        cfg = config.from_dict({"poolers": [{"kind": "pgbouncer", "name": "pgb", "dsn": b.admin_dsn,
                                             "pool_floor": FLOOR}]})
        a = Adapter(cfg.poolers[0], state)
        _until(lambda: _servers(b) == POOL, 20)
        time.sleep(3)
        t_start, steps = time.monotonic(), []
        for step, size in ((1, 6), (2, 4), (3, 2)) if way != "set-only" else ((3, 2),):
            said = ""
            if way == "dbguard":
                waited = _until(lambda: not a.collect().held, 30)
                said = a.set_shrink_step(step).detail
            else:
                waited = 0.0
                a._console().execute(f"SET default_pool_size = {size}")
                if way == "steps-unguarded":
                    a._console().execute("RECONNECT")
            steps.append({"size": size, "waited_s": waited, "in_effect_s": _until(lambda: _servers(b) <= size, 8),
                          "outcome": said})
        t_low = time.monotonic()
        time.sleep(8)
        t_steady, low = time.monotonic(), _servers(b)
        a._console().execute(f"SET default_pool_size = {POOL}")
        a.close()
        time.sleep(2)
        clients.stop()

        def lat(s, e):
            xs = clients.latencies(s, e)
            return {"median_s": round(statistics.median(xs), 3), "max_s": round(max(xs), 3)} if xs else None
        return {"way": way, "errors": clients.errors, "queries": clients.ok, "steps": steps,
                "servers_after_8s_low": low,
                "latency_before": lat(0, t_start), "latency_while_stepping": lat(t_start, t_low + 1),
                "latency_steady_low": lat(t_steady - 4, t_steady)}


WHAT = ("memcached", "pgbouncer")


def run(what: list[str], runs: int) -> dict:
    out: dict = {"memcached": [], "pgbouncer": []}
    if "memcached" in what:
        out["memcached"] = repeat(runs, ("memcached",), lambda _: memcached_run(),
                                  lambda r: json.dumps(r["steps"][:4]))
    if "pgbouncer" in what:
        from lab.pgcluster import PgCluster
        pg = PgCluster(settings={"max_connections": "60"}).start()
        try:
            out["pgbouncer"] = repeat(runs, POOLER_WAYS, lambda way: pooler_run(pg, way), json.dumps)
        finally:
            pg.destroy()
    return out


TITLE = "What a cache or pooler gives back when dbguard steps it down"


def body(data: dict) -> list[str]:
    """The report of one recorded run, below its title."""
    lines = [f"- Measured {data['when']}, git {data['git']}, `{data['command']}`; {data['runs']} run(s) each; "
             "figures are medians over the runs (max: the largest of any run).", ""]
    mc = data["results"].get("memcached") or []
    if mc:
        lines += ["### memcached: 256 MiB filled with 240 MiB, stepped to its 64 MiB floor and back", "",
                  "Through dbguard's adapter (`cache_memlimit`, then `slabs reassign -1 0` until it holds no more "
                  "than the limit). Held: `stats slabs` total_malloced; RSS: /proc.", "",
                  "| step | limit MiB | held MiB | RSS MiB | step took s |", "| --- | --- | --- | --- | --- |"]
        for i, row in enumerate(mc[0]["steps"]):
            at = [r["steps"][i] for r in mc]
            lines.append(f"| {row['step']} | {row['limit_mib']} | {median([x['held_mib'] for x in at])} | "
                         f"{median([x['rss_mib'] for x in at])} | {median([x['seconds'] for x in at])} |")
        lines.append("")
    pb = data["results"].get("pgbouncer") or []
    if pb:
        lines += [f"### PgBouncer: default_pool_size {POOL} -> {FLOOR} under {CLIENTS} clients", "",
                  f"PostgreSQL behind PgBouncer (transaction pooling); each client runs `{QUERY}` back to back "
                  "(2 shared cores: the query's own time grows with the clients running at once). Ways: `dbguard`, its "
                  "adapter stepping 8 -> 6 -> 4 -> 2, each step once the last has taken effect and no server "
                  "connection logs in (SET, then RECONNECT); `steps-unguarded`, the same three steps each SET + "
                  "RECONNECT as soon as the connections are down to the last size; `set-only`, SET 2 at once, no "
                  "RECONNECT. In effect: seconds until SHOW POOLS shows no more server connections than the size "
                  "(- : not within 8 s). Latency: a query's wait in PgBouncer's queue plus its run.", "",
                  "| way | runs with a client error | first error | in effect s (per step) | server connections after 8 s at 2 | "
                  "latency s before (median / max) | while stepping | steady at 2 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for way, rs in grouped(pb, "way", POOLER_WAYS):
            effect = " / ".join(str(median([r["steps"][i]["in_effect_s"] for r in rs]) or "-")
                                for i in range(len(rs[0]["steps"])))

            def lat(key):
                got = [r[key] for r in rs if r[key]]
                return (f"{median([x['median_s'] for x in got])} / {max(x['max_s'] for x in got)}" if got else "-")
            err = " ".join(next((r["errors"][0] for r in rs if r["errors"]), "").split()).replace("|", "/")
            lines.append(f"| {way} | {sum(1 for r in rs if r['errors'])}/{len(rs)} | {err[:140] or '-'} | {effect} | "
                         f"{median([r['servers_after_8s_low'] for r in rs])} | {lat('latency_before')} | "
                         f"{lat('latency_while_stepping')} | {lat('latency_steady_low')} |")
        lines.append("")
    lines += ["Raw figures: [giveback-results.json](giveback-results.json).", ""]
    return lines


RECORD = Standalone("giveback", TITLE, HERE / "giveback-results.json", HERE / "GIVEBACK-RESULTS.md", body)
section = RECORD.section


def _needs() -> None:
    from lab import require
    from lab.memcached import require as memcached_required
    from lab.pgbouncer import require as pgbouncer_required
    require.postgresql()
    memcached_required()
    pgbouncer_required()


def _one_of_what(x: str) -> str:
    if x not in WHAT:
        raise argparse.ArgumentTypeError(f"unknown {x!r}: choose memcached or pgbouncer")
    return x


def _what(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("what", nargs="*", type=_one_of_what, metavar="memcached|pgbouncer",
                    help="what to measure (default: both)")


def main(argv: list[str] | None = None) -> int:
    return RECORD.main(argv, __doc__, _needs, lambda a: run(a.what or list(WHAT), a.runs), _what)


if __name__ == "__main__":
    sys.exit(main())
