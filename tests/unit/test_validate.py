"""The validator check-config, run and SIGHUP share: every problem at once, one line each,
each naming its key, never a secret. Expected lines are written out by hand here."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from dbguard import config
from dbguard.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "S3cretCanary"


def problems(data: dict, host: bool = False) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as e:
        config.from_dict(data, host=host)
    assert all("\n" not in p for p in e.value.problems)
    return e.value.problems


def pg(dsn: str, **kw) -> dict:
    return {"kind": "postgresql", "dsn": dsn, **kw}


@pytest.mark.parametrize("section, key", [("general", "interval"), ("pressure", "hysteresis"),
                                          ("pressure", "min_dwell"), ("pressure", "warn_psi_some"),
                                          ("kill", "min_interval")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_must_be_finite(section, key, value):
    assert problems({section: {key: value}}) == (f"{section}.{key}: must be a finite number, got {value!r}",)


def test_every_float_key_is_covered_by_the_finite_check():
    import dataclasses
    import typing
    found = []
    for section in ("general", "pressure", "kill", "protection", "bpf"):
        cls = type(getattr(config.default(), section))
        for f in dataclasses.fields(cls):
            if typing.get_type_hints(cls)[f.name] is float:
                found.append(f"{section}.{f.name}")
                assert problems({section: {f.name: float("nan")}})[0].endswith("must be a finite number, got nan")
    assert "general.interval" in found and "pressure.hysteresis" in found
    for key in ("connect_timeout", "statement_timeout", "terminate_after", "close_idle_after"):
        assert problems({"databases": [pg("host=/x", **{key: float("inf")})]}) == (
            f"databases[0].{key}: must be a finite number, got inf",)


@pytest.mark.parametrize("dsn", [
    f"postgresql://user:{SECRET}@host/db",                  # URI userinfo
    f"dbname='x'password={SECRET}",                        # right after a quoted value
    f"postgresql://user@host/db?password={SECRET}",        # URI query parameter
    f"host=h password = {SECRET}",                         # spaces around =
    f"host=h sslpassword={SECRET}",                        # the client key's passphrase
    f"postgres://u:{SECRET}@h:5432/db?sslmode=require",
])
def test_a_password_in_any_form_is_refused_without_echo(dsn):
    out = problems({"databases": [pg(dsn)]})
    assert len(out) == 1 and out[0].startswith("databases[0].dsn: holds a ") and "password" in out[0], out
    assert SECRET not in out[0]


@pytest.mark.parametrize("dsn", [
    f"postgresql://user:{SECRET}%zz@host/db",               # bad percent-encoding in the password
    f"postgresql://user:{SECRET}@[::1/db",                  # unterminated IPv6 host: libpq quotes the URI
    f"host=h {SECRET}",                                     # a bare word: libpq quotes it
    f"dbname='{SECRET}",                                    # unterminated quote
])
def test_a_malformed_dsn_is_one_line_that_never_quotes_it(dsn):
    out = problems({"databases": [pg(dsn)]})
    assert len(out) == 1 and out[0].startswith("databases[0].dsn: not a libpq connection string or URI"), out
    assert SECRET not in out[0] and SECRET.lower() not in out[0].lower()


def test_only_libpq_option_names_stay_quoted_in_its_message():
    # "bogus" is no libpq option: it could as well be a password typed in the wrong place
    assert problems({"databases": [pg("host=h bogus=1")]}) == (
        'databases[0].dsn: not a libpq connection string or URI: invalid connection option "…"',)
    out = problems({"databases": [pg("host=h dbname")]})
    assert out == ('databases[0].dsn: not a libpq connection string or URI: missing "=" after "dbname" in '
                   'connection info string',)


def test_bad_port_in_a_dsn():
    assert problems({"databases": [pg("host=h port=99x")]}) == (
        "databases[0].dsn: port '99x' is not a port number (1-65535)",)
    assert problems({"databases": [pg("host=h port=70000")]}) == (
        "databases[0].dsn: port '70000' is not a port number (1-65535)",)


@pytest.mark.parametrize("a, b, shown", [
    (pg("host=/run/pg port=5433 dbname=a"), pg("host=/run/pg/ port=5433 dbname=b user=x"),
     "socket /run/pg/.s.PGSQL.5433"),
    (pg("host=db.example port=5432"), pg("postgresql://x@DB.example/other"), "host db.example port 5432"),
    (pg("dbname=a"), pg("dbname=b"), "socket (libpq's default socket directory)/.s.PGSQL.5432"),
    ({"kind": "mysql", "socket": "/run/mysqld/mysqld.sock"}, {"kind": "mysql", "socket": "/run/mysqld//mysqld.sock"},
     "socket /run/mysqld/mysqld.sock"),
    ({"kind": "mysql", "host": "10.0.0.5"}, {"kind": "mysql", "host": "10.0.0.5", "port": 3306},
     "host 10.0.0.5 port 3306"),
    # a PostgreSQL DSN pointed at a MySQL's TCP endpoint is the same endpoint all the same
    ({"kind": "mysql", "host": "h", "port": 5432}, pg("host=h"), "host h port 5432"),
])
def test_the_same_server_twice_is_one_line(a, b, shown):
    assert problems({"databases": [a, b]}) == (
        f"databases[1]: the same server as databases[0] ({shown}); list each server once",)


def test_different_servers_are_fine():
    config.from_dict({"databases": [pg("host=/run/pg port=5432"), pg("host=/run/pg port=5433"),
                                    {"kind": "mysql", "socket": "/run/mysqld/mysqld.sock"},
                                    {"kind": "mysql", "host": "h", "port": 3307}]})


@pytest.mark.parametrize("listen, ok", [("127.0.0.1:9633", True), ("[::1]:9633", True), ("", True),
                                        ("127.0.0.1:99999", False), ("127.0.0.1:0", False),
                                        ("127.0.0.1:65535", True), ("localhost", False), (":9633", False)])
def test_metrics_port_is_1_to_65535(listen, ok):
    if ok:
        config.from_dict({"metrics": {"listen": listen}})
    else:
        out = problems({"metrics": {"listen": listen}})
        assert out == (f"metrics.listen: expected HOST:PORT with a port from 1 to 65535 such as 127.0.0.1:9633 "
                       f'(or "" for no metrics), got {listen!r}',)


@pytest.mark.parametrize("data, line", [
    ({"pressure": {"cgroup": "/sys/fs/cgroup/memory/../../etc"}},
     "pressure.cgroup: must not contain '..', got '/sys/fs/cgroup/memory/../../etc'"),
    ({"general": {"state_dir": "state"}},
     "general.state_dir: must be an absolute path (the daemon's working directory is not yours), got 'state'"),
    ({"general": {"state_dir": "/var/lib/../tmp"}},
     "general.state_dir: must not contain '..', got '/var/lib/../tmp'; write the path it means"),
    ({"audit": {"path": "audit.jsonl"}},
     "audit.path: must be an absolute path (the daemon's working directory is not yours), got 'audit.jsonl'"),
    ({"audit": {"path": "/var/log/x/../../etc/passwd"}},
     "audit.path: must not contain '..', got '/var/log/x/../../etc/passwd'; write the path it means"),
    ({"audit": {"path": ""}}, "audit.path: set a file"),
    ({"databases": [{"kind": "mysql", "host": "h", "password_file": "pw"}]},
     "databases[0].password_file: must be an absolute path (the daemon's working directory is not yours), got 'pw'"),
    ({"kill": {"protect_exe": ["/usr/bin/x\n"]}},
     "kill.protect_exe: holds a control character ('/usr/bin/x\\n'); remove it"),
    ({"kill": {"min_rss": 2**70}}, "kill.min_rss: 1180591620717411303424 is larger than any memory (at most 1 EiB)"),
])
def test_paths_and_values_run_would_trip_on(data, line):
    assert problems(data) == (line,)


@pytest.mark.parametrize("data, start, end", [
    ({"kill": {"min_rss": "9" * 400}}, "kill.min_rss: '999", "9' is larger than any memory (at most 1 EiB)"),
    ({"kill": {"min_rss": "9" * 5000 + "MiB"}}, "kill.min_rss: '999", "B' is larger than any memory (at most 1 EiB)"),
    ({"kill": {"min_rss": "2" + "0" * 18 + ".5"}}, "kill.min_rss: '2000", "5' is larger than any memory (at most 1 EiB)"),
    ({"general": {"interval": 10**400}}, "general.interval: 1000", "0 is out of range"),
    ({"kill": {"min_rss": 10**5000}}, "kill.min_rss: (a number too long to show)", "(at most 1 EiB)"),
    ({"general": {"interval": 10**5000}}, "general.interval: (a number too long to show)", "is out of range"),
    ({"policy": {"rules": [{"rss_above": "9" * 400 + "x kill.min_rss", "action": "kill"}]}},
     "policy.rules[0].rss_above: factor 99999999999999999999 is too large", "(at most 1000000)"),
])
def test_huge_numbers_are_one_short_line(data, start, end):
    out = problems(data)
    assert len(out) == 1 and out[0].startswith(start) and out[0].endswith(end) and len(out[0]) < 160, out


def test_every_problem_at_once_each_naming_its_key():
    out = problems({"general": {"interval": float("nan"), "state_dir": "rel"},
                    "pressure": {"hysteresis": float("nan"), "min_dwell": float("inf"), "warn_usage": 0.99},
                    "kill": {"min_rs": 1, "enabled": "yes"},
                    "metrics": {"listen": "127.0.0.1:99999"},
                    "databases": [pg(f"postgresql://u:{SECRET}@h/db"), {"kind": "oracle"}]})
    keys = [p.split(":", 1)[0] for p in out]
    assert sorted(keys) == sorted(["general.interval", "general.state_dir", "pressure.hysteresis",
                                   "pressure.min_dwell", "kill.min_rs", "kill.enabled", "databases[1].kind",
                                   "pressure", "metrics.listen", "databases[0].dsn"]), out
    assert not any(SECRET in p for p in out)


# --- host checks -------------------------------------------------------------------------------

def test_password_file_must_be_owner_only(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(f"{SECRET}\n")
    data = {"databases": [{"kind": "mysql", "host": "h", "password_file": str(pw)}]}
    for mode in (0o644, 0o640, 0o604, 0o660):
        pw.chmod(mode)
        assert problems(data, host=True) == (
            f"databases[0].password_file: {pw} can be read or written by group or others (mode {mode:04o}); "
            f"chmod 600 {pw}",)
    pw.chmod(0o600)
    config.from_dict(data, host=True)
    pw.write_text("")
    assert problems(data, host=True) == (
        f"databases[0].password_file: {pw} is empty; write the password on its first line",)
    pw.unlink()
    assert problems(data, host=True) == (f"databases[0].password_file: cannot read {pw}: No such file or directory",)


def test_users_are_resolved(tmp_path):
    someone = pwd.getpwuid(os.getuid()).pw_name
    config.from_dict({"kill": {"protect_users": [someone, "0"]}}, host=True)
    out = problems({"kill": {"protect_users": [someone, "no-such-user-x"]},
                    "policy": {"rules": [{"user": ["no-such-user-y", someone], "action": "protect"}]}}, host=True)
    assert out == ("kill.protect_users: no user named 'no-such-user-x' on this host",
                   "policy.rules[0].user: no user named 'no-such-user-y' on this host")


def test_state_dir_that_is_a_file_and_audit_path_that_is_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    out = problems({"general": {"state_dir": str(tmp_path / "file")},
                    "audit": {"path": str(tmp_path / "dir")}}, host=True)
    assert out == (f"general.state_dir: {tmp_path}/file is not a directory",
                   f"audit.path: {tmp_path}/dir is a directory; add the file name")
    out = problems({"general": {"state_dir": str(tmp_path / "file" / "sub")}}, host=True)
    assert out == (f"general.state_dir: {tmp_path}/file is not a directory",)


def test_group_writable_state_dir_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    config.from_dict({"general": {"state_dir": str(d)}}, host=True)
    d.chmod(0o770)
    assert problems({"general": {"state_dir": str(d)}}, host=True) == (
        f"general.state_dir: {d} can be written by group or others (mode 0770): chmod go-w {d}",)


# --- files, exit codes, deep nesting --------------------------------------------------------------

def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbguard.cli", "check-config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_an_integer_thousands_of_digits_long_is_one_line(tmp_path):
    f = tmp_path / "big.toml"
    f.write_text("[kill]\nmin_rss = " + "9" * 5000 + "\n")
    r = check_config(f)
    assert r.returncode == 2 and r.stderr == (f"dbguard: {f}: not valid TOML for dbguard: an integer thousands of "
                                              "digits long\n"), r.stderr


@pytest.mark.parametrize("depth", [300, 600, 5000, 100_000])
def test_deep_nesting_is_one_line_and_exit_2(tmp_path, depth):
    f = tmp_path / "deep.toml"
    f.write_text("[kill]\nprotect_exe = " + "[" * depth + "]" * depth + "\n")
    r = check_config(f)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-500:]
    assert r.stderr.startswith(f"dbguard: {f}: not valid TOML") or r.stderr.startswith(
        "dbguard: kill.protect_exe: expected a list of strings"), r.stderr


def test_check_config_prints_every_problem_one_line_each(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(f'[general]\ninterval = nan\n[pressure]\nhysteresis = nan\nmin_dwell = nan\n'
                 f'[[databases]]\nkind = "postgresql"\ndsn = "postgresql://u:{SECRET}@h/db"\n'
                 f'[metrics]\nlisten = "127.0.0.1:99999"\n')
    r = check_config(f)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and sorted(ln.split(":")[1].strip() for ln in lines) == sorted([
        "general.interval", "pressure.hysteresis", "pressure.min_dwell", "metrics.listen", "databases[0].dsn"]), lines
    assert SECRET not in r.stderr + r.stdout


def test_a_key_with_an_escape_sequence_is_shown_escaped(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[kill]\n"x\\u001b[2J\\nforged line" = 1\n')
    r = check_config(f)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "\x1b" not in r.stderr, r.stderr
    assert r.stderr == 'dbguard: kill."x\\u001b[2J\\nforged line": unknown key\n'
