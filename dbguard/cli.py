"""The `dbguard` command. Every failure the user can fix is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import sys
import traceback

from . import __version__, escape, lean
from . import config as config_mod
from .errors import DbguardError
from .escape import printable
from .escape import say as _say
from .logsetup import FORMATS, LEVELS
from .logsetup import configure as configure_logging

lean.import_shutil()        # before argparse loads it with what it loads for archives
log = logging.getLogger("dbguard")

EXAMPLES = """\
examples:
  dbguard run --config /etc/dbguard/dbguard.toml     the sidecar (systemd runs this)
  dbguard run                                       protect local PostgreSQL and MySQL/MariaDB servers with defaults
  dbguard run --config FILE --dry-run                log every decision, change nothing
  dbguard check-config FILE                         validate a config: exit 0, or one line naming the key
  dbguard explain --config FILE                     what dbguard sees now and what it would do, and why
  dbguard explain --config FILE --pid 1234          why one process is (not) protected or a kill candidate
  dbguard check                                     which protections work on this host, and why not the others
  dbguard bpf-source                                the BPF C exactly as it is loaded
  dbguard bpf-compile --config FILE                 compile the BPF programs ahead of the first start

The config format is documented in config.example.toml; the audit log is JSON lines.
Exit codes: 0 ok, 1 internal error (a bug: please report it), 2 a problem you can fix (the message says how),
3 `dbguard check` found a protection off.
"""
CHECK_OFF = 3


def _config(path: str | None):
    # Without a file the defaults still meet this host's checks (state and audit directories).
    return config_mod.load(path) if path else config_mod.from_dict({}, host=True)


def cmd_run(a: argparse.Namespace) -> int:
    from .daemon import Daemon
    if os.geteuid() != 0:
        log.warning("not running as root: reading other users' processes, killing and BPF need "
                    "root or the capabilities listed in integrations/systemd/dbguard.service")
    d = Daemon(_config(a.config), dry_run=a.dry_run)
    try:
        d.catch_signals()
        d.open()
        return d.run()
    finally:
        d.close()


def cmd_check_config(a: argparse.Namespace) -> int:
    # The validator `run` and SIGHUP use: every problem at once, each one line (exit 2 in main).
    cfg = config_mod.load(a.file)
    for w in cfg.warnings:
        print(printable(f"{a.file}: warning: {w}"), file=sys.stderr)
    rules = len(cfg.policy.rules)
    _say(f"{a.file}: ok ({len(cfg.databases)} database(s)"
         f"{f', {len(cfg.caches)} cache(s)' if cfg.caches else ''}"
         f"{f', {len(cfg.poolers)} pooler(s)' if cfg.poolers else ''}"
         f"{f', {rules} policy rule(s)' if rules else ''}{', dry run' if cfg.general.dry_run else ''})")
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from .explain import explain, print_explanation
    return print_explanation(explain(_config(a.config)), only_pid=a.pid, as_json=a.json)


def cmd_check(a: argparse.Namespace) -> int:
    from .host import CAP_SYS_RESOURCE, has_capability
    from .kernel.attach import start_note
    from .kernel.bpf import protections
    cfg = _config(a.config)
    found: list[tuple[str, bool, str]] = []

    def report(name: str, active: bool, detail: str) -> None:
        found.append((name, bool(active), detail))

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
    if note := start_note(cfg):         # how the kernel path comes up: no protection is off either way
        report("bpf_start", True, note)
    degraded = _identify_databases(cfg, report)
    all_on = all(active for _, active, _ in found)
    if a.json:
        print(json.dumps({"all_active": all_on, "status": "degraded" if degraded else "ok", "degraded": degraded,
                          "protections": [{"name": name, "active": active, "detail": detail}
                                          for name, active, detail in found]}, indent=2))
    else:
        for name, active, detail in found:
            _say(f"{'on ' if active else 'OFF'}  {name:<22} {detail}")
        for line in degraded:
            _say(f"degraded: {line}")
    return 0 if all_on else CHECK_OFF


def _identify_databases(cfg, report) -> list[str]:
    """Each configured (else discovered) database's server, found by fact as `run` finds it
    (no login), and the scopes `run` would watch for them; the lines of those not found."""
    from .databases import identity, registry
    from .model import DbStats
    from .sense.scope import configured, group, scope_of
    dbs = cfg.databases or (tuple(registry.discover()) if cfg.general.discover else ())
    missing, own = [], {}
    for dc in dbs:
        f = registry.identify(dc)
        report("identify_database", f.ok, f"{dc.kind} {dc.name}: " + (
            f"server pid {f.pid} ({f.how})" if f.ok else f"not identified: {f.why_not}"))
        if not f.ok:
            missing.append(DbStats(name=dc.name, kind=dc.kind, up=False, identity=f.why_not))
        own[dc.name] = None          # not identified: where its limit lies is unknown (the host)
        if f.ok:
            with contextlib.suppress(DbguardError, OSError):
                own[dc.name] = scope_of(f.pid)
    scopes = [(configured(cfg.pressure.cgroup), tuple(own))] if cfg.pressure.cgroup else group(own)
    for scope, names in scopes:
        report("scope", True, f"{scope.name}: {', '.join(names) or 'no database'} ({scope.why})")
    return list(identity.degraded(missing).values())


def cmd_bpf_source(a: argparse.Namespace) -> int:
    from .kernel.source import program_source
    cfg = _config(a.config)
    sys.stdout.write(program_source(max_procs=cfg.bpf.max_procs, max_cgroups=cfg.bpf.max_cgroups))
    return 0


def cmd_bpf_compile(a: argparse.Namespace) -> int:
    from .kernel.attach import warm
    _say(warm(_config(a.config)))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dbguard", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Keep PostgreSQL and MySQL/MariaDB alive under memory pressure: shrink their caches, "
                    "end runaway sessions by SQL, kill memory hogs (never the database), in user space and "
                    "in the kernel (BPF).")
    ap.add_argument("--version", action="version", version=f"dbguard {__version__}")
    ap.add_argument("--log-level", choices=LEVELS, help="stderr log level (default info, or $DBGUARD_LOG_LEVEL)")
    ap.add_argument("--log-format", choices=FORMATS, help=(
        "stderr log lines as text or one JSON object each (default text, or $DBGUARD_LOG_FORMAT); under "
        "systemd the journal's timestamp is the only one"))
    ap.set_defaults(log_level=os.environ.get("DBGUARD_LOG_LEVEL", "info"),
                    log_format=os.environ.get("DBGUARD_LOG_FORMAT", "text"))
    # The same two options after the subcommand (`dbguard run --log-level debug`); SUPPRESS keeps
    # a subcommand that does not name them from resetting what came before it.
    logging_opts = argparse.ArgumentParser(add_help=False)
    logging_opts.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS, help="as before the command")
    logging_opts.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS, help="as before the command")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cfg_help = "TOML config (default: built-in defaults, local PostgreSQL and MySQL/MariaDB servers discovered)"

    p = sub.add_parser("run", parents=[logging_opts], help="run the sidecar", description=(
        "Watch memory pressure and protect the configured databases until SIGTERM; application caches "
        "([[caches]]) and poolers ([[poolers]]) give memory back before anything is killed. SIGHUP reloads "
        "thresholds, kill and protection rules from the config file. Writes every decision to the audit "
        "log ([audit] path) and serves Prometheus metrics ([metrics] listen)."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.add_argument("--dry-run", action="store_true",
                   help="decide and log as usual, change nothing (no kill, resize, cancel or score change)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("check-config", parents=[logging_opts], help="validate a config file", description=(
        "Validate FILE: exit 0 when it is good, else exit 2 with one line naming the key and the problem."))
    p.add_argument("file", metavar="FILE")
    p.set_defaults(fn=cmd_check_config)

    p = sub.add_parser("explain", parents=[logging_opts], help="show what dbguard sees and would do now", description=(
        "Take one snapshot (memory, databases, application caches and poolers, processes), run the policy "
        "on it and print the plan and "
        "the reason for each process's verdict, without acting."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.add_argument("--pid", type=int, metavar="N", help="explain only this process")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("check", parents=[logging_opts], help="report which protections work on this host", description=(
        "List each protection mechanism, whether it is active on this host, and if not, why and the fix; "
        "then each configured (or discovered) database's server as `run` finds it, by fact, without logging "
        "in: one it cannot identify makes protection \"degraded\" (every process running a database server "
        f"executable is shielded instead). Exit 0 when every one is on, {CHECK_OFF} when one is off or degraded."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("bpf-source", parents=[logging_opts], help="print the BPF C exactly as it is loaded", description=(
        "Print the BPF program source dbguard compiles with BCC, with the map sizes from the config."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.set_defaults(fn=cmd_bpf_source)

    p = sub.add_parser("bpf-compile", parents=[logging_opts], help="compile the BPF programs into the compile cache",
                       description=(
        "Compile the BPF programs for the running kernel with the config's sizes into <state_dir>/bpf and exit, "
        "so that `run` loads them from there without clang (it protects on the user-space path while it "
        "compiles otherwise). The Debian package and the Ansible role run it at install; run it again after "
        "booting a new kernel or changing [bpf] max_procs or max_cgroups if the first start should not "
        "compile. Exit 0 when compiled and kept (or kept already), 2 when BPF cannot be used here or the "
        "programs could not be kept (the line says why)."))
    p.add_argument("--config", "-c", metavar="FILE", help=cfg_help)
    p.set_defaults(fn=cmd_bpf_compile)
    return ap


def _stdout_gone() -> bool:
    """True when the reader of our stdout went away (`dbguard explain | head -1`)."""
    p = select.poll()
    p.register(sys.stdout.fileno(), select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in p.poll(0))


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.log_level not in LEVELS or a.log_format not in FORMATS:     # from the environment
        print(f"dbguard: DBGUARD_LOG_LEVEL must be one of {', '.join(LEVELS)} and DBGUARD_LOG_FORMAT one of "
              f"{', '.join(FORMATS)}; got {printable(a.log_level)!s} and {printable(a.log_format)!s}", file=sys.stderr)
        return 2
    configure_logging(a.log_level, a.log_format)
    escape.install()
    # Over a file-size limit (RLIMIT_FSIZE) a write fails with EFBIG, which the audit log
    # survives, instead of SIGXFSZ ending dbguard.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        code = a.fn(a)
        sys.stdout.flush()          # here, so a closed pipe is seen here and not at exit
        return code
    except DbguardError as e:
        for line in getattr(e, "problems", None) or (str(e),):
            print(f"dbguard: {printable(line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            return _internal_error(sys.exc_info()[1])
        # The reader has what it wanted; say nothing, as a program killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:
        return _internal_error(e)


def _internal_error(e: BaseException) -> int:
    if os.environ.get("DBGUARD_DEBUG"):
        traceback.print_exception(e)
    print(f"dbguard: internal error: {type(e).__name__}: {printable(e)} (set DBGUARD_DEBUG=1 for the traceback; "
          "please report it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
