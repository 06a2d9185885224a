"""integrations/ansible: the example playbook applies roles/dbguard to this machine for real
(ansible-playbook -c local), with every path the role writes moved into a temp dir: no real
/etc, no service started (systemd is not PID 1 here, which the role must notice)."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "integrations" / "ansible"
ROLE = ANSIBLE / "roles" / "dbguard"
VENV_BIN = Path(sys.executable).parent


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


class Run:
    def __init__(self, base: Path):
        self.base = base
        self.paths = {
            "dbguard_venv_dir": base / "opt" / "dbguard" / "venv",
            "dbguard_config_dir": base / "etc" / "dbguard",
            "dbguard_state_dir": base / "var" / "lib" / "dbguard",
            "dbguard_log_dir": base / "var" / "log" / "dbguard",
            "dbguard_unit_dir": base / "etc" / "systemd" / "system",
        }
        self.vars = {k: str(v) for k, v in self.paths.items()}
        self.vars.update({
            # this checkout, as the venv's dbguard
            "dbguard_pip_spec": str(ROOT),
            "dbguard_databases": [
                {"name": "main", "kind": "postgresql",
                 "dsn": "host=/var/run/postgresql dbname=postgres user=postgres"},
                {"name": "orders", "kind": "mysql", "socket": "/run/mysqld/mysqld.sock",
                 "user": "dbguard", "password_env": "DBGUARD_MYSQL_PASSWORD", "buffer_pool_floor": "256MiB"},
            ],
            "dbguard_metrics_listen": "127.0.0.1:9633",
        })
        self.inventory = base / "inventory.ini"
        self.inventory.write_text("[databases]\nlocalhost ansible_connection=local "
                                  "ansible_python_interpreter=/usr/bin/python3\n")
        self.varfile = base / "vars.json"
        self.varfile.write_text(json.dumps(self.vars))

    def playbook(self, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool("ansible-playbook"), "-i", str(self.inventory), "playbook.yml",
             "-e", f"@{self.varfile}", *extra],
            cwd=ANSIBLE, env=env(self.base / "ansible-home"), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """The role applied twice; yields (run, first result, second result)."""
    run = Run(tmp_path_factory.mktemp("ansible-role"))
    try:
        first = run.playbook()
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        second = run.playbook()
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
        yield run, first, second
    finally:
        shutil.rmtree(run.base, ignore_errors=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_role_applies_and_a_second_run_changes_nothing(applied):
    _, first, second = applied
    assert recap(first.stdout)["changed"] > 0
    assert recap(second.stdout)["changed"] == 0, second.stdout[-4000:]
    assert recap(second.stdout)["failed"] == 0


def test_files_and_modes(applied):
    run, _, _ = applied
    p = run.paths
    config = p["dbguard_config_dir"] / "dbguard.toml"
    unit = p["dbguard_unit_dir"] / "dbguard.service"
    assert mode(config) == 0o600, "the config may hold a DSN"
    assert mode(p["dbguard_config_dir"]) == 0o750
    assert mode(p["dbguard_state_dir"]) == 0o700
    assert mode(p["dbguard_log_dir"]) == 0o750
    assert mode(unit) == 0o644
    assert (p["dbguard_venv_dir"] / "bin" / "dbguard").exists()
    # the venv sees BCC, a Debian package
    r = subprocess.run([str(p["dbguard_venv_dir"] / "bin" / "python"), "-c", "import bcc"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rendered_config_passes_check_config_and_holds_the_variables(applied):
    run, _, _ = applied
    config = run.paths["dbguard_config_dir"] / "dbguard.toml"
    dbguard = run.paths["dbguard_venv_dir"] / "bin" / "dbguard"
    r = subprocess.run([str(dbguard), "check-config", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    from dbguard import config as cfgmod
    cfg = cfgmod.load(config)
    assert [d.name for d in cfg.databases] == ["main", "orders"]
    assert cfg.databases[1].buffer_pool_floor == 256 * 1024**2
    assert cfg.general.state_dir == run.vars["dbguard_state_dir"]
    assert cfg.audit.path == f"{run.vars['dbguard_log_dir']}/audit.jsonl"
    assert cfg.bpf.enabled == "auto"


def test_unit_points_at_the_role_paths_and_verifies(applied):
    run, first, _ = applied
    unit = run.paths["dbguard_unit_dir"] / "dbguard.service"
    text = unit.read_text()
    venv, conf = run.vars["dbguard_venv_dir"], run.vars["dbguard_config_dir"]
    assert f"ExecStart={venv}/bin/dbguard run --config {conf}/dbguard.toml" in text
    assert f"ReadWritePaths={run.vars['dbguard_state_dir']}" in text
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # no systemd as PID 1 in this machine: installed, not started, and said so
    assert "systemd is not running as PID 1" in first.stdout


def test_bad_variable_is_refused_by_argument_specs(tmp_path):
    run = Run(tmp_path)
    r = run.playbook("-e", "dbguard_warn_usage=lots")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "dbguard_warn_usage" in out and "float" in out, out[-3000:]
    assert not run.paths["dbguard_venv_dir"].exists(), "the role went on after a bad variable"
    r = run.playbook("-e", '{"dbguard_databases": [{"name": "x", "kind": "oracle"}]}')
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "kind" in out and "oracle" in out, out[-3000:]


def test_every_default_is_in_the_argument_specs_with_a_type_and_description():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options)
    for name, spec in options.items():
        assert spec.get("type") and spec.get("description"), name


def test_static_unit_is_the_role_template_with_default_paths():
    """integrations/systemd/dbguard.service and the role's template must not drift apart."""
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    template = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True).from_string(
        (ROLE / "templates" / "dbguard.service.j2").read_text())
    rendered = template.render(**defaults)
    static = (ROOT / "integrations" / "systemd" / "dbguard.service").read_text().replace(
        "/usr/bin/dbguard", f"{defaults['dbguard_venv_dir']}/bin/dbguard")
    drop_header = lambda text: [l for l in text.splitlines() if not l.startswith("# Rendered by the Ansible")]
    assert drop_header(rendered) == drop_header(static)


def test_ansible_lint_production_profile_passes(tmp_path):
    r = subprocess.run([tool("ansible-lint"), "--profile", "production", "--offline"],
                       cwd=ANSIBLE, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr
