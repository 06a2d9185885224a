"""The scope that can run out, found from fixture cgroup trees (v1 and v2) and /proc files."""
from __future__ import annotations

from pathlib import Path

import pytest

from dbguard.errors import DbguardError
from dbguard.sense.scope import scope_of

GiB = 1024**3
UNLIMITED_V1 = "9223372036854771712\n"


def tree(tmp: Path, version: int, limits: dict[str, str], pid_cgroup: str) -> tuple[str, str]:
    """A cgroup root with `limits` (relative dir -> limit file text) and /proc/42/cgroup."""
    root = tmp / "cg"
    base = root / "memory" if version == 1 else root
    if version == 2:
        root.mkdir()
        (root / "cgroup.controllers").write_text("cpu memory\n")
    name = "memory.limit_in_bytes" if version == 1 else "memory.max"
    for rel, text in limits.items():
        d = base / rel.strip("/") if rel.strip("/") else base
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    proc = tmp / "proc" / "42"
    proc.mkdir(parents=True)
    line = f"7:memory:{pid_cgroup}\n0::/\n" if version == 1 else f"0::{pid_cgroup}\n"
    (proc / "cgroup").write_text(line)
    return str(tmp / "proc"), str(root)


def test_the_limit_on_a_parent_slice_is_the_scope_siblings_included(tmp_path):
    proc, root = tree(tmp_path, 1, {"/": UNLIMITED_V1, "/system.slice": f"{GiB}\n",
                                    "/system.slice/postgresql@15-main.service": UNLIMITED_V1},
                      "/system.slice/postgresql@15-main.service")
    s = scope_of(42, proc, root)
    assert s.cgroup_dir == f"{root}/memory/system.slice" and s.limit_bytes == GiB
    assert "siblings included" in s.why


def test_the_database_own_limit_when_it_is_the_tightest(tmp_path):
    proc, root = tree(tmp_path, 1, {"/system.slice": f"{2 * GiB}\n", "/system.slice/pg.service": f"{GiB}\n"},
                      "/system.slice/pg.service")
    s = scope_of(42, proc, root)
    assert s.cgroup_dir == f"{root}/memory/system.slice/pg.service" and s.limit_bytes == GiB


def test_equal_limits_the_nearest_wins(tmp_path):
    proc, root = tree(tmp_path, 2, {"/a": f"{GiB}\n", "/a/b": f"{GiB}\n"}, "/a/b")
    assert scope_of(42, proc, root).cgroup_dir == f"{root}/a/b"


def test_no_limit_anywhere_is_the_host_never_inert(tmp_path):
    proc, root = tree(tmp_path, 2, {"/user.slice": "max\n", "/user.slice/db.scope": "max\n"},
                      "/user.slice/db.scope")
    s = scope_of(42, proc, root)
    assert s.cgroup_dir == "" and s.limit_bytes is None and "host's RAM" in s.why


def test_v2_tightest_up_the_tree(tmp_path):
    proc, root = tree(tmp_path, 2, {"/kubepods.slice": f"{4 * GiB}\n", "/kubepods.slice/pod": f"{GiB // 2}\n",
                                    "/kubepods.slice/pod/db": "max\n"}, "/kubepods.slice/pod/db")
    s = scope_of(42, proc, root)
    assert s.cgroup_dir == f"{root}/kubepods.slice/pod" and s.limit_bytes == GiB // 2


def test_a_limit_at_or_above_ram_limits_nothing(tmp_path):
    proc, root = tree(tmp_path, 1, {"/big": f"{1 << 50}\n"}, "/big")
    assert scope_of(42, proc, root).cgroup_dir == ""


def test_a_process_that_is_gone_is_one_line(tmp_path):
    proc, root = tree(tmp_path, 1, {}, "/")
    with pytest.raises(DbguardError, match="process 43 does not exist"):
        scope_of(43, proc, root)


def test_a_database_outside_the_configured_scope_is_named_as_not_watched():
    from dbguard.sense.scope import Scope, covers, unwatched
    pod_a = Scope("/sys/fs/cgroup/memory/kubepods/pod-a", 400 * 1024**2, "")
    pod_b = Scope("/sys/fs/cgroup/memory/kubepods/pod-b", 512 * 1024**2, "")
    node = Scope("", None, "")
    parent = Scope("/sys/fs/cgroup/memory/kubepods", 2 * GiB, "")
    assert covers(node, pod_b) and covers(parent, pod_b) and covers(pod_a, pod_a)
    assert not covers(pod_a, pod_b) and not covers(Scope("/sys/fs/cgroup/memory/kubepods/pod", None, ""), pod_a)
    assert unwatched(pod_a, {"a": pod_a}) == ""
    assert unwatched(parent, {"a": pod_a, "b": pod_b}) == ""
    assert unwatched(pod_a, {"a": pod_a, "b": pod_b}) == (
        "not watched: the memory limit of b (/sys/fs/cgroup/memory/kubepods/pod-b, 512 MiB); set [pressure] "
        "cgroup to a cgroup above all of them, or leave it unset to watch each database's own scope")


POD_A = "/sys/fs/cgroup/memory/kubepods/pod-a"
POD_B = "/sys/fs/cgroup/memory/kubepods/pod-b"


def test_each_database_own_scope_is_watched_and_a_shared_one_once():
    from dbguard.sense.scope import Scope, group
    a, b = Scope(POD_A, 400 * 1024**2, "a's"), Scope(POD_B, 512 * 1024**2, "b's")
    got = group({"pg1": a, "maria": b, "pg2": Scope(POD_A, 400 * 1024**2, "a's again")})
    assert [(s.cgroup_dir, names) for s, names in got] == [(POD_A, ("pg1", "pg2")), (POD_B, ("maria",))]
    assert got[0][0].why == "a's"        # the first database's account of it


def test_unlimited_and_unidentified_databases_share_the_host_scope():
    from dbguard.sense.scope import HOST, Scope, group
    host = Scope("", None, "no memory limit on ...")
    got = group({"a": host, "b": None, "c": Scope(POD_B, GiB, "")})
    assert [(s.name, names) for s, names in got] == [("host", ("a", "b")), (POD_B, ("c",))]
    assert group({}) == [(HOST, ())]
    assert group({"x": None}) == [(HOST, ("x",))]


@pytest.mark.parametrize("memcg, scopes, want", [
    ("/kubepods/pod-a/c1", ["/kubepods/pod-a", "/kubepods/pod-b"], 0),
    ("/kubepods/pod-b", ["/kubepods/pod-a", "/kubepods/pod-b"], 1),
    ("/kubepods/pod-ab", ["/kubepods/pod-a", "/kubepods/pod-b"], 0),        # in neither: the first
    ("/kubepods/pod-ab", ["/kubepods/pod-a", None], 1),                      # the host holds it
    ("/kubepods/pod-a/c1", [None, "/kubepods", "/kubepods/pod-a"], 2),       # the innermost wins
    ("/kubepods/pod-b/c1", [None, "/kubepods", "/kubepods/pod-a"], 1),
    ("/user.slice", [None], 0),
])
def test_a_process_is_answered_in_the_innermost_scope_that_holds_it(memcg, scopes, want):
    from dbguard.sense.scope import owner
    assert owner(memcg, scopes) == want


def test_processes_are_split_by_the_scope_that_answers_for_them():
    from types import SimpleNamespace as P

    from dbguard.sense.scope import held
    procs = {1: P(memcg="/"), 10: P(memcg="/kubepods/pod-a"), 11: P(memcg="/kubepods/pod-a/c"),
             20: P(memcg="/kubepods/pod-b"), 30: P(memcg="/system.slice/x")}
    a, b = held(procs, ["/kubepods/pod-a", "/kubepods/pod-b"])
    assert (sorted(a), sorted(b)) == ([1, 10, 11, 30], [20]), "outside every scope: the first's"
    host, a = held(procs, [None, "/kubepods/pod-a"])
    assert (sorted(host), sorted(a)) == ([1, 20, 30], [10, 11])
