"""The `dbguard` command. Every failure the user can fix is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from . import __version__
from . import config as config_mod
from .errors import DbguardError

log = logging.getLogger("dbguard")

EXAMPLES = """\
examples:
  dbguard run --config /etc/dbguard/dbguard.toml     the sidecar (systemd runs this)
  dbguard run                                       protect local PostgreSQL servers with defaults
  dbguard run --config FILE --dry-run                log every decision, change nothing
  dbguard check-config FILE                         validate a config: exit 0, or one line naming the key
  dbguard explain --config FILE                     what dbguard sees now and what it would do, and why
  dbguard explain --config FILE --pid 1234          why one process is (not) protected or a kill candidate
  dbguard check                                     which protections work on this host, and why not the others
  dbguard bpf-source                                the BPF C exactly as it is loaded

The config format is documented in config.example.toml; the audit log is JSON lines.
Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 a problem you can fix (the message says how).
"""


def _config(path: str | None):
    return config_mod.load(path) if path else config_mod.default()


def cmd_run(a: argparse.Namespace) -> int:
    from .daemon import Daemon
    if os.geteuid() != 0:
        log.warning("not running as root: reading other users' processes, killing and BPF need "
                    "root or the capabilities listed in integrations/systemd/dbguard.service")
    d = Daemon(_config(a.config), dry_run=a.dry_run)
    try:
        d.open()
        return d.run()
    finally:
        d.close()


def cmd_check_config(a: argparse.Namespace) -> int:
    cfg = config_mod.load(a.file)
    for dc in cfg.databases:
        # A missing password file is a config error; an env variable is only set where the
        # service runs (systemd Environment=), so it is checked at connect time instead.
        if dc.password_file:
            dc.password()
    for w in cfg.warnings:
        print(f"{a.file}: warning: {w}", file=sys.stderr)
    rules = len(cfg.policy.rules)
    print(f"{a.file}: ok ({len(cfg.databases)} database(s)"
          f"{f', {rules} policy rule(s)' if rules else ''}{', dry run' if cfg.general.dry_run else ''})")
    return 0


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def cmd_explain(a: argparse.Namespace) -> int:
    from .daemon import explain
    from .model import Role
    out = explain(_config(a.config))
    snap, plan, policy = out["snapshot"], out["plan"], out["policy"]
    order = {p.pid: i for i, p in enumerate(policy.candidates(snap), 1)}
    kernel = policy.kernel_view(snap)
    verdicts = policy.verdicts(snap)     # the plan's own verdicts: PSS is not read a second time
    rows = []
    for pid, proc in sorted(snap.procs.items()):
        role = snap.roles.get(pid, Role.OTHER)
        v = verdicts[pid]
        rows.append({"pid": pid, "comm": proc.comm, "role": role.value, "rss_bytes": proc.rss_bytes,
                     "pss_bytes": v.pss_bytes, "oom_score_adj": proc.oom_score_adj, "memcg": proc.memcg,
                     "exe": proc.exe,
                     "verdict": "protected" if v.protected else "candidate" if v.candidate else "left alone",
                     "preferred": v.preferred, "why": v.why, "rule": v.rule, "rule_index": v.rule_index,
                     "action": v.action, "tier": v.tier, "tier_source": v.tier_source, "weight": v.weight,
                     "kill_order": order.get(pid),
                     "kernel": "shield" if pid in kernel.protected else
                               "candidate" if pid in kernel.candidates else "none"})
    if a.pid is not None:
        rows = [r for r in rows if r["pid"] == a.pid]
        if not rows:
            raise DbguardError(f"explain --pid {a.pid}: no such process (it may have exited)")
    m = snap.memory
    if a.json:
        print(json.dumps({
            "memory": {"cgroup": m.cgroup or "host", "usage_bytes": m.usage_bytes, "limit_bytes": m.limit_bytes,
                       "reclaimable_bytes": m.reclaimable_bytes, "psi_some_avg10": m.psi_some_avg10,
                       "psi_full_avg10": m.psi_full_avg10},
            "level": plan.level.name.lower(), "level_reason": plan.level_reason,
            "databases": [{"name": d.name, "kind": d.kind, "up": d.up, "error": d.error, "server_pid": d.server_pid,
                           "cache_bytes": d.cache_bytes, "hit_ratio": d.hit_ratio, "shrink_step": d.shrink_step,
                           "shrink_steps_max": d.shrink_steps_max, "sessions": len(d.sessions)}
                          for d in snap.databases],
            "processes": rows,
            "plan": [{"action": x.kind.value, "target": x.target, "reason": x.reason, "pid": x.pid,
                      "value": x.value} for x in plan.actions],
            "held": [{"target": t, "reason": why} for t, why in plan.held]}, indent=2))
        return 0
    if a.pid is not None:
        r = rows[0]
        print(f"pid {r['pid']} ({r['comm']}): {r['verdict']}{' (preferred)' if r['preferred'] else ''} - {r['why']}")
        pss = "" if r["pss_bytes"] is None else f", pss {_mib(r['pss_bytes'])}"
        print(f"  role {r['role']}, rss {_mib(r['rss_bytes'])}{pss}, oom_score_adj {r['oom_score_adj']}, "
              f"memory cgroup {r['memcg']}, exe {r['exe'] or '?'}")
        given = "" if r["tier_source"] == r["rule"] else f" from {r['tier_source']}"
        print(f"  decided by {r['rule']}: action {r['action'] or 'none'}, tier {r['tier']}{given} "
              f"(kill order of tiers: {' < '.join(policy.rules.tiers)})")
        if r["kill_order"]:
            print(f"  kill order now: {r['kill_order']} of {len(order)} candidate(s)")
        print("  in the kernel (BPF maps): " + {
            "shield": "shielded (never killed there; a kernel OOM kill of it is reported as a breach)",
            "candidate": "kill candidate (killed as it allocates once reclaim keeps failing at the kill level)",
            "none": "not listed" + (" (a later tier: listed once the earlier candidates are gone)"
                                    if r["kill_order"] else "")}[r["kernel"]])
        mine = [x for x in plan.actions if x.pid == a.pid]
        for x in mine:
            print(f"  now: {x.kind.value}: {x.reason}")
        if not mine:
            print(f"  now (level {plan.level.name.lower()}): nothing would be done to it")
        return 0
    print(f"memory: {m.cgroup or 'host'}: usage {_mib(m.usage_bytes)} of {_mib(m.limit_bytes)}, "
          f"reclaimable {_mib(m.reclaimable_bytes)}, PSI some {m.psi_some_avg10:.1f}% full {m.psi_full_avg10:.1f}%")
    print(f"level: {plan.level.name.lower()} - {plan.level_reason}")
    for d in snap.databases:
        state = "up" if d.up else f"DOWN ({d.error})"
        print(f"database {d.name} ({d.kind}): {state}; server pid {d.server_pid}; cache {_mib(d.cache_bytes)}"
              f"; hit ratio {'-' if d.hit_ratio is None else f'{d.hit_ratio:.3f}'}; shrink step "
              f"{d.shrink_step}/{d.shrink_steps_max}; {len(d.sessions)} session(s)")
    if not snap.databases:
        print("databases: none configured or found")
    by_role: dict[str, list[int]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append(r["rss_bytes"])
    print("memory by process class (RSS; shared buffers count in every process that touched them): " + ", ".join(
        f"{role} {len(v)} procs {_mib(sum(v))}" for role, v in sorted(by_role.items()) if role != "kernel_thread"))
    shown = [r for r in rows if r["role"] not in ("kernel_thread",) and
             (r["verdict"] != "left alone" or r["rss_bytes"] >= 16 * 2**20)]
    print(f"processes ({len(shown)} shown of {len(rows)}: protected, candidates, and others over 16 MiB; "
          f"tiers {' < '.join(policy.rules.tiers)}; #N = kill order, K = in-kernel candidate):")
    for r in sorted(shown, key=lambda r: (r["verdict"], r["kill_order"] or 0, -r["rss_bytes"])):
        pos = f"#{r['kill_order']}" if r["kill_order"] else ""
        k = "K" if r["kernel"] == "candidate" else ""
        print(f"  {r['pid']:>7} {r['comm'][:15]:<15} {_mib(r['rss_bytes']):>9} adj {r['oom_score_adj']:>5} "
              f"{r['verdict']:<10} {pos:>4}{k:1} {r['tier'][:10]:<10} "
              f"{'' if r['why'].startswith(r['rule']) else r['rule'] + ': '}{r['why']}")
    print("plan:" if plan.actions else "plan: nothing to do at this level")
    for x in plan.actions:
        print(f"  {x.kind.value} {x.target}: {x.reason}")
    for target, why in plan.held:
        print(f"  held back {target}: {why}")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from .daemon import CAP_SYS_RESOURCE, has_capability
    from .kernel.bpf import protections
    cfg = _config(a.config)
    lines = []
    ok_all = True

    def report(name: str, active: bool, detail: str) -> None:
        nonlocal ok_all
        ok_all &= active
        lines.append(f"{'on ' if active else 'OFF'}  {name:<22} {detail}")

    report("pidfd_kill", hasattr(os, "pidfd_open"), "kills go through a pidfd, so a reused pid is never hit")
    root = os.geteuid() == 0
    report("kill_hogs", root and cfg.kill.enabled, "non-database hogs in the watched cgroup are killed at high level"
           if root and cfg.kill.enabled else "needs root (CAP_KILL) and kill.enabled = true")
    report("raise_candidate_scores", root and cfg.protection.raise_candidates,
           "hogs' oom_score_adj raised so the kernel OOM killer picks them first")
    lower = has_capability(CAP_SYS_RESOURCE)
    report("lower_database_scores", lower and cfg.protection.lower_databases,
           "database processes' oom_score_adj lowered" if lower else
           "no CAP_SYS_RESOURCE: the kernel refuses lower scores; candidates are raised instead")
    psi = os.path.exists("/proc/pressure/memory")
    report("psi", psi, "PSI wakes the loop at once" if psi else "no /proc/pressure/memory: boot with psi=1")
    for name, active, detail in protections():
        report(name, active, detail)
    print("\n".join(lines))
    return 0


def cmd_bpf_source(a: argparse.Namespace) -> int:
    from .kernel.source import program_source
    cfg = _config(a.config)
    sys.stdout.write(program_source(max_procs=cfg.bpf.max_procs, max_cgroups=cfg.bpf.max_cgroups))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dbguard", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Keep PostgreSQL and MySQL/MariaDB alive under memory pressure: shrink their caches, "
                    "end runaway sessions by SQL, kill memory hogs (never the database), in user space and "
                    "in the kernel (BPF).")
    ap.add_argument("--version", action="version", version=f"dbguard {__version__}")
    ap.add_argument("--log-level", default=os.environ.get("DBGUARD_LOG_LEVEL", "info"),
                    choices=["debug", "info", "warning", "error"], help="stderr log level (default info)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cfg_help = "TOML config (default: built-in defaults, local PostgreSQL servers discovered)"

    p = sub.add_parser("run", help="run the sidecar", description=(
        "Watch memory pressure and protect the configured databases until SIGTERM. SIGHUP reloads "
        "thresholds, kill and protection rules from the config file. Writes every decision to the audit "
        "log ([audit] path) and serves Prometheus metrics ([metrics] listen)."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.add_argument("--dry-run", action="store_true",
                   help="decide and log as usual, change nothing (no kill, resize, cancel or score change)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file", description=(
        "Validate FILE: exit 0 when it is good, else exit 2 with one line naming the key and the problem."))
    p.add_argument("file", metavar="FILE")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("explain", help="show what dbguard sees and would do now", description=(
        "Take one snapshot (memory, databases, processes), run the policy on it and print the plan and "
        "the reason for each process's verdict, without acting."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.add_argument("--pid", type=int, metavar="N", help="explain only this process")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("check", help="report which protections work on this host", description=(
        "List each protection mechanism, whether it is active on this host, and if not, why and the fix."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("bpf-source", help="print the BPF C exactly as it is loaded", description=(
        "Print the BPF program source dbguard compiles with BCC, with the map sizes from the config."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.set_defaults(fn=cmd_bpf_source)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s dbguard %(levelname)s %(message)s")
    try:
        return a.fn(a)
    except DbguardError as e:
        print(f"dbguard: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("DBGUARD_DEBUG"):
            traceback.print_exc()
        print(f"dbguard: internal error: {type(e).__name__}: {e} (set DBGUARD_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
