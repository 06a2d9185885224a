"""The Debian package for real: `make deb` (dpkg-buildpackage, lintian clean), then on this
machine `apt-get install ./dist/dbguard_<version>_all.deb`, the installed command, unit,
conffile and logrotate config checked and the shipped config run, then `apt-get purge`
leaving no file behind."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from lab.launcher import audit_records

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DEB = ROOT / "dist" / f"dbguard_{VERSION}_all.deb"
CONFIG = Path("/etc/dbguard/dbguard.toml")
UNIT = Path("/lib/systemd/system/dbguard.service")
# What dbguard and systemd make at run time, outside the package's file list.
RUNTIME_DIRS = (Path("/var/lib/dbguard"), Path("/var/log/dbguard"))
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "--no-install-recommends"]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

pytestmark = pytest.mark.root


def sh(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout)


def installed() -> bool:
    r = sh("dpkg-query", "-W", "-f=${Status}", "dbguard")
    return r.returncode == 0 and r.stdout.endswith(" installed")


@pytest.fixture(scope="module")
def package():
    """Built, installed; yields dpkg's file list; purged at the end."""
    if os.geteuid() != 0:
        pytest.fail("installing a .deb needs root: run the suite as root", pytrace=False)
    if installed():                  # a run of this test that died half-way
        sh(*APT, "purge", "dbguard")
    strays = [str(p) for p in (CONFIG.parent, *RUNTIME_DIRS) if p.exists()]
    if strays:
        pytest.fail(f"{', '.join(strays)} exist but the dbguard package is not installed: something else uses "
                    "them; this test installs and purges the package, which would remove them", pytrace=False)
    built = subprocess.run(["bash", "scripts/build-deb.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    lintian = [line for line in built.stdout.splitlines() + built.stderr.splitlines()
               if line[:2] in ("E:", "W:")]
    assert lintian == [], lintian
    r = sh(*APT, "install", str(DEB))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    try:
        listed = sh("dpkg-query", "-L", "dbguard").stdout.split()
        yield [p for p in listed if os.path.isfile(p)]        # its files (not /lib, /etc, ...)
    finally:
        if installed():
            purged = sh(*APT, "purge", "dbguard")
            assert purged.returncode == 0, purged.stdout[-3000:] + purged.stderr[-3000:]


def test_installs_the_command_from_the_distributions_python(package):
    assert "/usr/bin/dbguard" in package
    r = sh("/usr/bin/dbguard", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dbguard {VERSION}", r.stdout + r.stderr
    assert "/usr/lib/python3/dist-packages/dbguard/bpf/dbguard.h" in package
    head = Path("/usr/bin/dbguard").read_text().splitlines()[0]
    assert head == "#! /usr/bin/python3" or head == "#!/usr/bin/python3", head


def test_config_is_a_root_only_conffile_in_dry_run(package):
    conffiles = sh("dpkg-query", "-W", "-f=${Conffiles}", "dbguard").stdout
    assert f" {CONFIG} " in conffiles and " /etc/logrotate.d/dbguard " in conffiles, conffiles
    assert stat.S_IMODE(CONFIG.stat().st_mode) == 0o600
    assert stat.S_IMODE(CONFIG.parent.stat().st_mode) == 0o750
    assert tomllib.loads(CONFIG.read_text())["general"]["dry_run"] is True
    r = sh("/usr/bin/dbguard", "check-config", str(CONFIG))
    assert r.returncode == 0 and "dry run" in r.stdout, r.stdout + r.stderr


def test_unit_is_installed_disabled_and_verifies_with_its_man_page(package):
    assert str(UNIT) in package and "/usr/share/man/man1/dbguard.1.gz" in package
    assert not list(Path("/etc/systemd/system").glob("*.wants/dbguard.service")), "the package enabled the unit"
    r = sh("systemd-analyze", "verify", str(UNIT))        # the man check on: Documentation=man:dbguard(1)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stdout + r.stderr
    man = sh("man", "-P", "cat", "dbguard")
    assert man.returncode == 0 and "check-config" in man.stdout and "/etc/dbguard/dbguard.toml" in man.stdout


def test_check_and_logrotate_config(package):
    r = sh("/usr/bin/dbguard", "check")
    assert r.returncode in (0, 3) and "internal error" not in r.stderr, r.stdout + r.stderr
    assert "pidfd_kill" in r.stdout
    r = sh("logrotate", "--debug", "/etc/logrotate.d/dbguard")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/var/log/dbguard/*.jsonl" in r.stdout + r.stderr


@pytest.mark.bpf
def test_the_install_compiled_the_bpf_programs(package):
    """The postinst ran `dbguard bpf-compile` on the shipped config: the programs are in the
    compile cache, and compiling again finds them there (what `run` would load)."""
    kept = list(Path("/var/lib/dbguard/bpf").glob("programs-*.json"))
    assert len(kept) == 1, kept
    r = sh("/usr/bin/dbguard", "bpf-compile", "--config", str(CONFIG))
    assert r.returncode == 0 and r.stdout.startswith("already compiled: loaded from the compile cache"), \
        r.stdout + r.stderr
    # The file itself: `man dbguard` may show a formatted copy cached from an older package
    # (/var/cache/man/cat1), the package's man page being dated by its changelog.
    man = sh("man", "-P", "cat", "-l", "/usr/share/man/man1/dbguard.1.gz")
    assert "usage: dbguard bpf-compile" in man.stdout, man.stdout


@pytest.mark.bpf
def test_the_shipped_config_runs_and_changes_nothing(package, tmp_path):
    """`dbguard run` on /etc/dbguard/dbguard.toml as shipped (only the metrics port moved to a
    free one, so a parallel run elsewhere cannot clash): it starts, protects in dry run, stops."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = CONFIG.read_text()
    assert 'listen = "127.0.0.1:9633"' in text
    config = tmp_path / "dbguard.toml"
    config.write_text(text.replace('listen = "127.0.0.1:9633"', f'listen = "127.0.0.1:{port}"'))
    config.chmod(0o600)
    audit = Path(tomllib.loads(text)["audit"]["path"])
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(["/usr/bin/dbguard", "run", "--config", str(config)], stdout=f,
                                stderr=subprocess.STDOUT, env=ENV, cwd="/", start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [r for r in audit_records(audit) if r["action"] == "start"]:
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no start record in {audit}: {out.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, out.read_text()[-3000:]
    records = audit_records(audit)
    start = next(r for r in records if r["action"] == "start")
    assert start["result"] == "protecting (dry run)", start
    acted = [r for r in records if "dry_run" in r and not r["dry_run"]]
    assert acted == [], acted
    assert "Traceback" not in out.read_text()


def test_purge_leaves_no_file(package):
    """Runs last in this module: purge now, then look."""
    r = sh(*APT, "purge", "dbguard")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not installed()
    left = [p for p in package if os.path.lexists(p)]
    assert left == [], left
    for d in (CONFIG.parent, *RUNTIME_DIRS, Path("/usr/lib/python3/dist-packages/dbguard")):
        assert not d.exists(), f"{d} is left after purge"
    helper = list(Path("/var/lib/systemd").glob("deb-systemd-helper-*/**/dbguard.service*"))
    assert helper == [], helper
