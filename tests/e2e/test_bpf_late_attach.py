"""The kernel path attached after the start (dbguard.kernel.attach): `dbguard run` protects on
the user-space path while BCC compiles in its child, then attaches the programs with their own
audit record; with [bpf] enabled = true a compile that fails then stops it with one line.

Needs root, BCC and kernel headers (`make setup`) and PostgreSQL's binaries; without them the
tests FAIL with the reason. The compile failure is a real one: the C copied with a line that is
not C, through DBGUARD_BPF_DIR (as tests/e2e/test_bpf.py's compile-error test does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dbguard.kernel import layout
from dbguard.kernel.attach import COMPILING
from lab.launcher import DbguardRun, base_config

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.e2e, pytest.mark.db]


def _held_map_ids(pid: int) -> list[int]:
    ids = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:       # closed while read
            continue
        ids += [int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("map_id:")]
    return ids


def procs_map_keys(pid: int) -> set[int]:
    """The tgids in the "procs" map that process `pid` holds, as bpftool reads the kernel's map
    (the oracle: not dbguard's own reading)."""
    for map_id in _held_map_ids(pid):
        show = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                                         capture_output=True, text=True, check=True).stdout)
        if show.get("name") != "procs":
            continue
        dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                                         capture_output=True, text=True, check=True).stdout)
        keys = set()
        for e in dump:
            if "formatted" in e:
                keys.add(int(e["formatted"]["key"]))
            else:
                keys.add(int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little"))
        return keys
    return set()


def _config(tmp_path: Path, dsn: str, enabled) -> dict:
    cfg = base_config(tmp_path)
    cfg["databases"] = [{"name": "main", "kind": "postgresql", "dsn": dsn}]
    cfg["bpf"] = {"enabled": enabled}
    cfg["general"]["dry_run"] = True        # what is asserted is what it protects, not what it changes
    return cfg


def test_a_first_start_protects_while_it_compiles_then_attaches(tmp_path):
    """An empty state directory: the "start" record (protecting) says the kernel path is
    compiling, a "bpf_attached" record follows it (compiled, not from the cache), and the
    kernel's procs map the daemon holds then shields the postmaster."""
    from lab.pgcluster import PgCluster
    with PgCluster() as pg:
        assert not (tmp_path / "state" / "bpf").exists()
        with DbguardRun(tmp_path, _config(tmp_path, pg.dsn, True)) as run:
            run.wait_protecting(kernel=False)
            start = next(r for r in run.audit() if r["action"] == "start")
            assert start["result"] == "protecting (dry run)" and COMPILING in start["reason"], start
            _, attached = run.wait_kernel_path(timeout=120)
            assert attached["action"] == "bpf_attached", attached
            assert attached["from_cache"] is False and attached["seconds"] > 0, attached
            assert "compiled; kept in" in attached["reason"], attached
            actions = [r["action"] for r in run.audit()]
            assert actions.index("start") < actions.index("bpf_attached"), actions
            postmaster = pg.postmaster_pid()
            run.wait_for(lambda: postmaster in procs_map_keys(run.pid), 30, "the postmaster in the procs map")
            assert run.stop() == 0, run.tail(3)
        assert "Traceback" not in run.output(None)


def _broken_c(tmp_path: Path) -> Path:
    broken = tmp_path / "broken-bpf"
    shutil.copytree(layout.BPF_DIR, broken)
    with open(broken / "oom.c", "a") as f:
        f.write("\nthis is not C;\n")
    return broken


def test_a_late_compile_failure_with_bpf_required_stops_with_one_line(tmp_path, monkeypatch):
    """[bpf] enabled = true and C that does not compile: dbguard protects first (the failure
    shows only in the child), then says it in a "bpf_failed" record, stops as a stop does (its
    "stop" record) and exits 2 with one line naming the compile error."""
    from lab.pgcluster import PgCluster
    monkeypatch.setenv("DBGUARD_BPF_DIR", str(_broken_c(tmp_path)))
    with PgCluster() as pg:
        with DbguardRun(tmp_path, _config(tmp_path, pg.dsn, True)) as run:
            run.wait_for(lambda: not run.running(), 120, "its exit")
        out = run.output(None)
        assert run.returncode == 2, out
        actions = [r["action"] for r in run.audit()]
        assert actions[0] == "start" and actions[-2:] == ["bpf_failed", "stop"], actions
        assert "bpf_attached" not in actions, actions
        failed = next(r for r in run.audit() if r["action"] == "bpf_failed")
        assert failed["result"].startswith("stopping"), failed
        last = [ln for ln in out.splitlines() if ln.strip()][-1]
        assert last.startswith("dbguard: BPF programs failed to load: ") and "error" in last, out
        assert "enabled = true requires it" in last and "Traceback" not in out, out


def test_a_late_compile_failure_with_bpf_auto_goes_on_in_user_space(tmp_path, monkeypatch):
    """enabled = "auto": the same failure is a "bpf_failed" record and a warning; dbguard runs
    on and stops cleanly."""
    from lab.pgcluster import PgCluster
    monkeypatch.setenv("DBGUARD_BPF_DIR", str(_broken_c(tmp_path)))
    with PgCluster() as pg:
        with DbguardRun(tmp_path, _config(tmp_path, pg.dsn, "auto")) as run:
            _, rec = run.wait_kernel_path(timeout=120)
            assert rec["action"] == "bpf_failed" and rec["result"] == "running on the user-space path alone", rec
            assert "BPF programs failed to load" in rec["reason"], rec
            assert run.stop() == 0, run.tail(3)          # 2 had it stopped on the failure
        assert "running on the user-space path alone: BPF programs failed to load" in run.output(None)


def test_bpf_compile_fills_the_cache_and_the_next_start_loads_from_it(tmp_path):
    """`dbguard check` says the next start would compile; `dbguard bpf-compile` compiles into
    state_dir/bpf and exits; again, it finds them kept, and check says the next start loads them;
    `dbguard run` then loads them (its kernel path from the compile cache), and says at its
    start that it loads them rather than compiles."""
    from lab.launcher import REPO, dbguard_command, toml
    from lab.pgcluster import PgCluster
    from dbguard.kernel.attach import LOADING
    with PgCluster() as pg:
        cfg = _config(tmp_path, pg.dsn, True)
        path = tmp_path / "warm.toml"
        path.write_text(toml(cfg))
        def bpf_start() -> str:         # what `dbguard check` says of the next start
            r = subprocess.run(dbguard_command("check", "--json", "--config", str(path)), cwd=REPO,
                               capture_output=True, text=True, timeout=120)
            return next(p["detail"] for p in json.loads(r.stdout)["protections"] if p["name"] == "bpf_start")
        assert bpf_start().startswith("the next start compiles the BPF programs (\"kernel path compiling\"")
        said = []
        for _ in range(2):
            r = subprocess.run(dbguard_command("bpf-compile", "--config", str(path)), cwd=REPO,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0 and r.stderr == "", r
            said.append(r.stdout.strip())
        kept = list((tmp_path / "state" / "bpf").glob("programs-*.json"))
        assert len(kept) == 1 and said[0] == f"compiled; kept in {kept[0]}", said
        assert said[1].startswith("already compiled: loaded from the compile cache"), said
        assert bpf_start() == f"the next start loads the BPF programs from the compile cache in {kept[0].parent}, " \
            "without a compile"
        with DbguardRun(tmp_path, cfg) as run:
            run.wait_protecting(kernel=False)
            start = next(r for r in run.audit() if r["action"] == "start")
            assert LOADING in start["reason"], start
            _, attached = run.wait_kernel_path(timeout=120)
            assert attached["action"] == "bpf_attached" and attached["from_cache"] is True, attached
            assert attached["result"] == "BPF path active (programs from the compile cache)", attached
            assert run.stop() == 0, run.tail(3)
        off = {**cfg, "bpf": {"enabled": False}}
        path.write_text(toml(off))
        r = subprocess.run(dbguard_command("bpf-compile", "--config", str(path)), cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "BPF path off ([bpf] enabled = false): nothing to compile", r


def _loader_child(parent: int, cache_dir: Path, timeout: float = 30.0) -> int:
    """The pid of dbguard's BPF loader child, found by the cache directory on its command line
    (python -m dbguard.kernel.loader FD MAX_PROCS MAX_CGROUPS CACHE_DIR)."""
    from lab.procs import find_by_cmdline, ppid, wait_until
    if not wait_until(lambda: find_by_cmdline(str(cache_dir)), timeout, poll=0.005):
        pytest.fail(f"dbguard (pid {parent}) started no BPF loader child in {timeout:g} s", pytrace=False)
    pid = find_by_cmdline(str(cache_dir))
    assert pid is not None and ppid(pid) == parent, (pid, parent)
    return pid


def test_the_user_path_answers_a_hog_while_the_kernel_path_is_not_attached(tmp_path, make_cgroup, procs):
    """The window before the kernel path attaches, held open: a first start (nothing compiled)
    whose loader child the test stops (SIGSTOP) as soon as it exists, so the BPF programs cannot
    attach. A hog then grows past the limit of the memory cgroup PostgreSQL runs in. The user-space
    path must end it: the hog killed (SIGKILL), dbguard's own kill record for it on path "user",
    zero kernel OOM kills (the cgroup's counter), the postmaster and dbguard alive, and no
    "bpf_attached" yet. The child then runs on and the kernel path attaches."""
    import signal
    import subprocess as sp

    from lab import hog
    from lab.launcher import audit_names
    from lab.pgcluster import PgCluster
    MiB = 1024 * 1024
    cg = make_cgroup(600 * MiB)
    with PgCluster(settings={"shared_buffers": "128MB"}, cgroup=cg) as pg:
        cfg = _config(tmp_path, pg.dsn, True)
        cfg["general"]["dry_run"] = False
        cfg["pressure"] = {"cgroup": str(cg.path)}
        with DbguardRun(tmp_path, cfg) as run:
            loader = _loader_child(run.pid, tmp_path / "state" / "bpf")
            os.kill(loader, signal.SIGSTOP)
            try:
                run.wait_protecting(kernel=False)
                postmaster = pg.postmaster_pid()
                # 10 MiB every 50 ms up to 900 MiB: past the 600 MiB limit in about 3 s.
                h = procs.add(hog.spawn(900 * MiB, 10 * MiB, 0.05, 60, preexec_fn=cg.preexec(), stdout=sp.DEVNULL))
                try:
                    code = h.wait(timeout=60)
                except sp.TimeoutExpired:
                    pytest.fail(f"the hog was not ended in 60 s; audit: {run.audit()[-3:]}", pytrace=False)
                actions = [r["action"] for r in run.audit()]
                kills = [r for r in run.audit() if r["action"] == "kill" and audit_names(r, h.pid)]
                assert code == -signal.SIGKILL, (code, actions)
                assert kills and kills[0]["path"] == "user" and kills[0]["result"].startswith("killed"), kills
                assert cg.oom_kills() == 0, f"the kernel OOM-killed {cg.oom_kills()} process(es); audit: {actions}"
                assert "bpf_attached" not in actions and "bpf_failed" not in actions, actions
                assert pg.postmaster_pid() == postmaster and os.path.exists(f"/proc/{postmaster}"), postmaster
                assert run.running(), run.tail(5)
            finally:
                os.kill(loader, signal.SIGCONT)
            _, attached = run.wait_kernel_path(timeout=120)
            assert attached["action"] == "bpf_attached", attached
            assert run.stop() == 0, run.tail(3)
        assert "Traceback" not in run.output(None)
