"""Databases in other namespaces: the pure parts (NSpid, paths resolved inside a container's
root, the namespace_of forms) and what the validator says about namespace_of. The real
namespaces are in tests/integration/test_namespaces.py. Expected values are written out here."""
from __future__ import annotations

import pytest

from dbguard import config
from dbguard.databases.namespaces import parse_nspid, resolve_in_root, spec_problem
from dbguard.databases.postgresql.adapter import _host_pids
from dbguard.errors import ConfigError, DbguardError

STATUS = "Name:\tpostgres\nTgid:\t20209\nNgid:\t0\nPid:\t20209\nPPid:\t20203\nNSpid:\t20209\t5\nNSsid:\t20203\t1\n"


def test_nspid_lists_the_host_pid_first_and_the_containers_last():
    assert parse_nspid(STATUS) == [20209, 5]
    assert parse_nspid("Name:\tx\nNSpid:\t77\n") == [77]        # in the host's pid namespace only
    assert parse_nspid("Name:\tx\n") == []                       # a kernel without NSpid


def links(table: dict[str, str]):
    return lambda p: table.get(p)


def test_absolute_links_start_again_at_the_containers_root():
    # Debian's /var/run -> /run, inside the container: the container's /run, never the host's
    readlink = links({"/var/run": "/run"})
    assert resolve_in_root("/var/run/postgresql", readlink) == "/run/postgresql"


def test_relative_links_and_dot_dot_stay_inside_the_root():
    readlink = links({"/srv/data": "../../../../escape", "/a/b": "c/d"})
    assert resolve_in_root("/srv/data/x", readlink) == "/escape/x"
    assert resolve_in_root("/a/b/e", readlink) == "/a/c/d/e"
    assert resolve_in_root("/../../etc/./passwd", links({})) == "/etc/passwd"


def test_a_link_loop_is_one_line_not_a_hang():
    with pytest.raises(DbguardError, match="too many levels of symbolic links"):
        resolve_in_root("/a/x", links({"/a": "/b", "/b": "/a"}))


@pytest.mark.parametrize("spec, why", [
    ("41237", None),
    ("/run/containerd/pg.pid", None),
    ("/sys/fs/cgroup/memory/kubepods/pod1", None),
    ("1", "names pid 1: not a process in a container (pid 1 is the host's init); set the host pid of a process "
          "in the database's container"),
    ("00", "names pid 0: not a process in a container (pid 1 is the host's init); set the host pid of a process "
           "in the database's container"),
    ("pod1", "expected a host pid, a pid file or a cgroup directory (an absolute path under /sys/fs/cgroup/), "
             "got 'pod1'"),
    ("/sys/fs/cgroup/../etc", "must not contain '..', got '/sys/fs/cgroup/../etc'"),
])
def test_namespace_of_forms(spec, why):
    assert spec_problem(spec) == why


def problems(dbs: list[dict]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as e:
        config.from_dict({"databases": dbs})
    return e.value.problems


def test_namespace_of_needs_a_unix_socket():
    assert problems([{"kind": "postgresql", "dsn": "host=10.0.0.5 user=postgres", "namespace_of": "4000"}]) == (
        "databases[0].namespace_of: dbguard reaches a server in a container through its unix socket; set "
        "host=/socket/directory in dsn (the path inside the container), not a TCP address",)
    assert problems([{"kind": "postgresql", "dsn": "user=postgres", "namespace_of": "4000"}])[0].startswith(
        "databases[0].namespace_of: dbguard reaches a server in a container through its unix socket")
    assert problems([{"kind": "mysql", "host": "10.0.0.5", "namespace_of": "4000"}]) == (
        "databases[0].namespace_of: dbguard reaches a server in a container through its unix socket; set "
        "socket (the path inside the container), not a TCP address",)
    assert problems([{"kind": "mysql", "socket": "/run/mysqld/mysqld.sock", "namespace_of": "pod"}]) == (
        "databases[0].namespace_of: expected a host pid, a pid file or a cgroup directory (an absolute path "
        "under /sys/fs/cgroup/), got 'pod'",)


def test_the_same_socket_path_in_two_containers_is_two_servers():
    pod = {"kind": "postgresql", "dsn": "host=/var/run/postgresql user=postgres"}
    cfg = config.from_dict({"databases": [{**pod, "name": "a", "namespace_of": "4000"},
                                          {**pod, "name": "b", "namespace_of": "5000"}, {**pod, "name": "host"}]})
    assert [d.namespace_of for d in cfg.databases] == ["4000", "5000", ""]
    assert problems([{**pod, "name": "a", "namespace_of": "4000"}, {**pod, "name": "b", "namespace_of": "4000"}]) == (
        "databases[1]: the same server as databases[0] (socket /var/run/postgresql/.s.PGSQL.5432); "
        "list each server once",)


def test_session_pids_are_mapped_to_the_hosts_and_vanished_ones_dropped():
    rows = [[12, "client backend", "active"], [6, "checkpointer", None], [99, "client backend", "idle"]]
    assert _host_pids(rows, {12: 20230, 6: 20211}) == [[20230, "client backend", "active"],
                                                     [20211, "checkpointer", None]]
    assert _host_pids(rows, None) is rows          # the server shares our pid namespace
