"""integrations/ansible: the example playbook applies roles/dbguard to this machine for real
(ansible-playbook -c local): the .deb that `make deb` builds is installed, configured, upgraded
to a newer package, and uninstalled, with a second run of each changing nothing. systemd is
not PID 1 here, which the role must notice (installed, not started); its handlers are still
notified, which the output shows (RUNNING HANDLER).

The machine's own /etc/dbguard is used, as test_deb.py does: both install and purge the package."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "integrations" / "ansible"
ROLE = ANSIBLE / "roles" / "dbguard"
VENV_BIN = Path(sys.executable).parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CONFIG = Path("/etc/dbguard/dbguard.toml")
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def tool(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} is missing: run `bash scripts/setup-integrations.sh` "
                    "(pip packages ansible-core and ansible-lint into .venv)")
    return path


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C.UTF-8", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_HOME": str(home), "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def recap(output: str) -> dict[str, int]:
    m = re.search(r"^localhost\s+:\s+(.*)$", output, re.M)
    assert m, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def handlers(output: str) -> list[str]:
    return re.findall(r"^RUNNING HANDLER \[dbguard : (\w+) dbguard\]", output, re.M)


def package_version() -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "dbguard"], capture_output=True, text=True)
    status, _, version = r.stdout.rpartition(" ")
    return version if r.returncode == 0 and status.endswith("installed") else None


class Role:
    """ansible-playbook on this machine with a variables file."""

    def __init__(self, base: Path):
        self.base = base
        self.inventory = base / "inventory.ini"
        self.inventory.write_text("[databases]\nlocalhost ansible_connection=local "
                                  "ansible_python_interpreter=/usr/bin/python3\n")
        self.vars: dict = {
            "dbguard_databases": [
                {"name": "main", "kind": "postgresql",
                 "dsn": "host=/var/run/postgresql dbname=postgres user=postgres"},
                {"name": "orders", "kind": "mysql", "socket": "/run/mysqld/mysqld.sock",
                 "user": "dbguard", "password_env": "DBGUARD_MYSQL_PASSWORD", "buffer_pool_floor": "256MiB"},
            ],
            "dbguard_metrics_listen": "127.0.0.1:9633",
            # this machine's kernel has no Debian headers package (scripts/setup-host.sh links some)
            "dbguard_kernel_headers_package": "",
            "dbguard_extra_config": {
                "pressure": {"warn_psi_some": 5.0},
                "policy": {"rules": [{"name": "batch jobs first", "action": "prefer", "user": ["nobody"]}]},
                "caches": [{"name": "app-cache", "kind": "redis", "url": "redis://127.0.0.1:6379", "floor": "64MiB"}],
                "poolers": [{"kind": "pgbouncer",
                             "dsn": "host=/run/postgresql port=6432 dbname=pgbouncer user=pgbouncer"}],
            },
        }

    def play(self, *extra: str, **variables) -> subprocess.CompletedProcess:
        varfile = self.base / "vars.json"
        varfile.write_text(json.dumps({**self.vars, **variables}))
        return subprocess.run(
            [tool("ansible-playbook"), "-i", str(self.inventory), "playbook.yml", "-e", f"@{varfile}", *extra],
            cwd=ANSIBLE, env=env(self.base / "ansible-home"), capture_output=True, text=True, timeout=900)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert recap(r.stdout)["failed"] == 0
    return r.stdout


def newer_package(deb: Path, out: Path) -> Path:
    """The same package with a higher version: what an upgrade installs."""
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, env=SYSTEM_ENV)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {VERSION}+upgrade1", control.read_text(), flags=re.M))
    newer = out / f"dbguard_{VERSION}+upgrade1_all.deb"
    subprocess.run(["dpkg-deb", "-b", "--root-owner-group", str(tree), str(newer)], check=True,
                   capture_output=True, env=SYSTEM_ENV)
    return newer


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.fail("the role installs a .deb: run the suite as root", pytrace=False)
    if package_version() is None and CONFIG.parent.exists():
        pytest.fail(f"{CONFIG.parent} exists but the dbguard package is not installed: something else uses it; "
                    "this test installs and purges the package", pytrace=False)
    built = subprocess.run(["bash", "scripts/build-deb.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    deb = ROOT / "dist" / f"dbguard_{VERSION}_all.deb"
    base = tmp_path_factory.mktemp("debs")
    yield deb, newer_package(deb, base)
    if package_version() is not None:
        subprocess.run(["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "purge", "dbguard"],
                       capture_output=True, env=SYSTEM_ENV)


@pytest.mark.root
def test_install_reload_restart_upgrade_uninstall(debs, tmp_path):
    deb, newer = debs
    role = Role(tmp_path)

    # install, from a path on the controller
    first = ok(role.play(dbguard_deb=str(deb)))
    assert package_version() == VERSION
    assert "systemd is not running as PID 1" in first
    assert stat.S_IMODE(CONFIG.stat().st_mode) == 0o600, "the config may hold a DSN"
    r = subprocess.run(["/usr/bin/dbguard", "check-config", str(CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = tomllib.loads(CONFIG.read_text())
    assert [d["name"] for d in cfg["databases"]] == ["main", "orders"]
    assert cfg["databases"][1]["buffer_pool_floor"] == "256MiB" and cfg["general"]["dry_run"] is False
    assert cfg["pressure"]["warn_psi_some"] == 5.0 and cfg["pressure"]["warn_usage"] == 0.8   # extra merged in
    assert cfg["policy"]["rules"] == [{"name": "batch jobs first", "action": "prefer", "user": ["nobody"]}]
    assert cfg["caches"][0]["url"] == "redis://127.0.0.1:6379" and cfg["poolers"][0]["kind"] == "pgbouncer"
    assert cfg["bpf"]["enabled"] == "auto" and cfg["metrics"]["listen"] == "127.0.0.1:9633"
    # the BPF programs compiled for this config into its state directory: a start loads them
    kept = list(Path(cfg["general"].get("state_dir", "/var/lib/dbguard"), "bpf").glob("programs-*.json"))
    assert len(kept) == 1, kept
    r = subprocess.run(["/usr/bin/dbguard", "bpf-compile", "--config", str(CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("already compiled: "), r.stdout + r.stderr

    # idempotent
    again = ok(role.play(dbguard_deb=str(deb)))
    assert recap(again)["changed"] == 0, again[-4000:]

    # a threshold: SIGHUP applies it -> reload, not restart
    out = ok(role.play(dbguard_deb=str(deb), dbguard_warn_usage=0.75))
    assert tomllib.loads(CONFIG.read_text())["pressure"]["warn_usage"] == 0.75
    assert handlers(out) == ["Reload"], out[-4000:]

    # a policy rule from dbguard_extra_config: reload as well
    extra = {**role.vars["dbguard_extra_config"], "policy": {"rules": []}}
    out = ok(role.play(dbguard_deb=str(deb), dbguard_warn_usage=0.75, dbguard_extra_config=extra))
    assert handlers(out) == ["Reload"], out[-4000:]

    # the metrics listener: SIGHUP does not apply it -> restart, not reload
    out = ok(role.play(dbguard_deb=str(deb), dbguard_warn_usage=0.75, dbguard_extra_config=extra,
                       dbguard_metrics_listen="127.0.0.1:9634"))
    assert handlers(out) == ["Restart"], out[-4000:]
    role.vars.update(dbguard_warn_usage=0.75, dbguard_extra_config=extra, dbguard_metrics_listen="127.0.0.1:9634")

    # upgrade: the newer package, the role's config kept, a restart
    before = CONFIG.read_text()
    out = ok(role.play(dbguard_deb=str(newer)))
    assert package_version() == f"{VERSION}+upgrade1"
    assert handlers(out) == ["Restart"], out[-4000:]
    assert CONFIG.read_text() == before
    again = ok(role.play(dbguard_deb=str(newer)))
    assert recap(again)["changed"] == 0, again[-4000:]

    # uninstall, twice
    out = ok(role.play(dbguard_state="absent"))
    assert package_version() is None and recap(out)["changed"] > 0
    for gone in (CONFIG.parent, Path("/usr/bin/dbguard"), Path("/var/cache/dbguard"), Path("/var/lib/dbguard")):
        assert not gone.exists(), f"{gone} is left after dbguard_state=absent"
    again = ok(role.play(dbguard_state="absent"))
    assert recap(again)["changed"] == 0, again[-4000:]


def test_bad_variables_are_refused_before_any_change(tmp_path):
    role = Role(tmp_path)
    for extra, words in ((("-e", "dbguard_warn_usage=lots"), ("dbguard_warn_usage", "float")),
                         (("-e", '{"dbguard_databases": [{"name": "x", "kind": "oracle"}]}'), ("kind", "oracle")),
                         (("-e", "dbguard_state=gone"), ("dbguard_state", "gone"))):
        r = role.play(*extra, dbguard_deb="/nonexistent/dbguard.deb")
        out = r.stdout + r.stderr
        assert r.returncode != 0 and all(w in out for w in words), out[-3000:]
        assert "Install |" not in out, "the role went on after a bad variable"


def test_no_package_given_is_one_clear_line(tmp_path):
    r = Role(tmp_path).play("--tags", "dbguard_install")
    assert r.returncode != 0 and "dbguard_deb is empty" in r.stdout, r.stdout[-3000:]


def test_every_default_is_in_the_argument_specs_with_a_type_and_description():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, spec in options.items():
        assert spec.get("type") and spec.get("description"), name


def test_no_pypi_name_and_only_platforms_with_python_3_11():
    text = "\n".join(p.read_text() for p in ANSIBLE.rglob("*.yml"))
    assert "pip" not in re.findall(r"ansible\.builtin\.(\w+)", text)
    meta = yaml.safe_load((ROLE / "meta" / "main.yml").read_text())["galaxy_info"]["platforms"]
    # the distribution's python3: bookworm 3.11, trixie 3.13, noble 3.12 (jammy's 3.10 is too old)
    assert {(p["name"], v) for p in meta for v in p["versions"]} == {
        ("Debian", "bookworm"), ("Debian", "trixie"), ("Ubuntu", "noble")}


def test_ansible_lint_production_profile_passes(tmp_path):
    r = subprocess.run([tool("ansible-lint"), "--profile", "production", "--offline"],
                       cwd=ANSIBLE, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr
