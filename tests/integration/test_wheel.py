"""The wheel as a user gets it: built from a copy of this checkout, installed into a fresh venv
that sees only the distribution's Python packages (Debian's python3-psycopg, -pymysql,
-bpfcc; no index, no pip config), then run from outside the
source tree: `--version`, `bpf-source`, `check`, `explain` on a real PostgreSQL and a short
`run --dry-run` that loads the BPF programs from the installed package."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from lab.launcher import DbguardRun, base_config

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEBIAN_PACKAGES = ("python3-psycopg", "python3-pymysql", "python3-tenacity", "python3-bpfcc")
# What the build reads (a copy, so no build/ or egg-info of an earlier build leaks in).
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "dbguard")


def clean_env() -> dict[str, str]:
    """No pip configuration (this machine's pip.conf adds local indexes and wheel directories)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LC_ALL": "C.UTF-8"}


def debian_packages_present() -> None:
    missing = [p for p in DEBIAN_PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout != "install ok installed"]
    if missing:
        pytest.fail(f"Debian packages missing: {' '.join(missing)}; run `make setup` "
                    "(scripts/setup-host.sh installs them)", pytrace=False)


def build_wheel(out: Path) -> Path:
    src = out / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the fresh venv's bin directory)."""
    debian_packages_present()
    base = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(base)
    venv = base / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-index", "-q", str(wheel)],
                       capture_output=True, text=True, env=clean_env(), cwd=base, timeout=300)
    assert r.returncode == 0, ("the wheel's dependencies are not met by Debian's packages alone: "
                               + r.stdout[-3000:] + r.stderr[-3000:])
    yield wheel, venv / "bin"
    shutil.rmtree(base, ignore_errors=True)


def dbguard(bin_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # cwd "/" so nothing of the checkout can be imported by accident
    return subprocess.run([str(bin_dir / "dbguard"), *args], capture_output=True, text=True,
                          cwd="/", env=clean_env(), timeout=timeout)


def test_wheel_is_ours_and_carries_the_bpf_sources_license_and_types(installed):
    wheel, _ = installed
    assert wheel.name.startswith(f"dbguard_sidecar-{PYPROJECT['version']}-py3-none-any")
    names = set(zipfile.ZipFile(wheel).namelist())
    for c in (ROOT / "dbguard" / "bpf").iterdir():
        if c.suffix in (".c", ".h"):
            assert f"dbguard/bpf/{c.name}" in names
    assert "dbguard/py.typed" in names
    dist_info = f"dbguard_sidecar-{PYPROJECT['version']}.dist-info"
    assert f"{dist_info}/LICENSE" in names
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Name: dbguard-sidecar" in meta
    # the hard requirements are plain names Debian has; psycopg's own libpq build is an extra
    required = {re.split(r"[ ;<>=(\[]", line.split(": ", 1)[1])[0].lower() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert required == {"psycopg", "pymysql", "tenacity"}, required


def test_it_runs_on_the_distributions_packages(installed):
    _, bin_dir = installed
    r = subprocess.run([str(bin_dir / "python"), "-c",
                        "import dbguard, psycopg, pymysql, bcc; "
                        "print('\\n'.join(m.__file__ for m in (dbguard, psycopg, pymysql, bcc)))"],
                       capture_output=True, text=True, cwd="/", env=clean_env())
    assert r.returncode == 0, r.stderr
    ours, *deps = r.stdout.split()
    assert ours.startswith(str(bin_dir.parent / "lib")), ours
    assert all(d.startswith("/usr/lib/python3/dist-packages/") for d in deps), deps


def test_version_comes_from_the_package_metadata(installed):
    _, bin_dir = installed
    r = dbguard(bin_dir, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dbguard {PYPROJECT['version']}", r.stdout + r.stderr


def test_bpf_source_is_read_from_the_installed_package(installed):
    _, bin_dir = installed
    r = dbguard(bin_dir, "bpf-source")
    assert r.returncode == 0, r.stderr
    for c in sorted((ROOT / "dbguard" / "bpf").glob("*.c")):
        assert f"/* ---- bpf/{c.name} ---- */" in r.stdout
        # the body of each file, as the checkout has it (its #include is inlined away)
        body = [line for line in c.read_text().splitlines() if line.strip() and not line.startswith("#include")]
        assert all(line in r.stdout for line in body), c.name


def test_check_reports_every_protection_without_an_internal_error(installed):
    _, bin_dir = installed
    r = dbguard(bin_dir, "check", "--json")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    names = {p["name"] for p in json.loads(r.stdout)["protections"]}
    assert {"pidfd_kill", "kill_hogs", "psi"} <= names and any("bpf" in n for n in names), names


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.db
def test_short_dry_run_against_a_real_postgresql(installed, tmp_path, postgresql_host):
    from lab.pgcluster import PgCluster
    _, bin_dir = installed
    with PgCluster() as pg:
        cfg = base_config(tmp_path)
        cfg["databases"] = [{"name": "main", "kind": "postgresql", "dsn": pg.dsn}]
        cfg["bpf"] = {"enabled": True}      # the programs must load from the installed package
        r = dbguard(bin_dir, "explain", "--json", "--config", str(_write(tmp_path / "explain.toml", cfg)))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        db = json.loads(r.stdout)["databases"][0]
        assert db["up"] and db["server_pid"] == pg.postmaster_pid(), db     # Debian's psycopg reached it
        with DbguardRun(tmp_path, cfg, "--dry-run", command=[str(bin_dir / "dbguard")]) as run:
            run.wait_protecting(timeout=120)
            start = next(rec for rec in run.audit() if rec["action"] == "start")
            assert start["result"] == "protecting (dry run)"
            assert "postgresql main" in start["reason"], start
            attached = next(rec for rec in run.audit() if rec["action"] in ("bpf_attached", "bpf_failed"))
            assert attached["action"] == "bpf_attached" and "BPF path active" in attached["result"], attached
            assert run.stop() == 0, run.output()
        assert "Traceback" not in run.output() and "internal error" not in run.output()
        records = run.audit()
        assert not [rec for rec in records if rec["action"] in ("kill", "cancel", "terminate", "resize")], records


def _write(path: Path, cfg: dict) -> Path:
    from lab.launcher import toml
    path.write_text(toml(cfg))
    return path


def test_sdist_carries_the_bpf_sources_and_license(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                        "print(b.build_sdist(sys.argv[1]))", str(tmp_path / "out")],
                       cwd=src, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    name = r.stdout.split()[-1]
    assert name == f"dbguard-sidecar-{PYPROJECT['version']}.tar.gz", name
    import tarfile
    with tarfile.open(tmp_path / "out" / name) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    expected = {f"dbguard/bpf/{p.name}" for p in (ROOT / "dbguard" / "bpf").iterdir() if p.suffix in (".c", ".h")}
    assert expected <= members and {"LICENSE", "dbguard/py.typed", "pyproject.toml"} <= members
