"""databases/sockets.py: the kernel's socket tables and PostgreSQL's socket lock file, parsed
from recorded copies (tests/fixtures/net), and the holder of a socket found in a fixture /proc."""
from __future__ import annotations

import os
from pathlib import Path

from dbguard.databases import identity, sockets
from dbguard.databases.sockets import Listener

NET = Path(__file__).resolve().parent.parent / "fixtures" / "net"


def test_tcp_listeners_only_with_addresses_in_host_order():
    got = sockets.parse_tcp((NET / "tcp").read_text())
    assert Listener("127.0.0.1", 5432, 5313) in got              # 0100007F:1538
    assert Listener("127.0.0.1", 3306, 9739) in got              # 0100007F:0CEA
    assert all(not (t.port == 0x80BA or t.inode in (0, 6358)) for t in got)   # TIME_WAIT, ESTABLISHED
    assert len(got) == 4


def test_tcp6_addresses():
    got = sockets.parse_tcp((NET / "tcp6").read_text())
    assert got == [Listener("::1", 0x18EB, 4636), Listener("::1", 0x1111, 7492)]


def test_unix_listening_paths_only():
    got = sockets.parse_unix((NET / "unix").read_text())
    assert got["/var/run/postgresql/.s.PGSQL.5432"] == 5314
    assert got["/run/mysqld/mysqld.sock"] == 9740
    # the test cluster's listening socket, not one of the connected sockets bound to the same path
    assert got["/tmp/dbguard-pg-56u1hn1y/sock/.s.PGSQL.59625"] == 775672
    assert len(got) == 3                                          # no unnamed, no abstract socket


def test_lock_file():
    assert sockets.parse_lock_file((NET / "s.PGSQL.5432.lock").read_text()) == (2205, "/var/lib/postgresql/15/main")
    for bad in ("", "\n", "abc\n/d\n", "0\n/d\n", "12\n", "-3\n/d\n"):
        assert sockets.parse_lock_file(bad) is None, bad


def test_which_listener_a_client_reaches():
    lo, any4, any6, mapped = (Listener("127.0.0.1", 5432, 1), Listener("0.0.0.0", 5432, 2), Listener("::", 5432, 3),
                              Listener("::ffff:10.0.0.5", 5432, 4))
    assert sockets.serves(lo, "127.0.0.1", 5432) and sockets.serves(lo, "localhost", 5432)
    assert not sockets.serves(lo, "127.0.0.1", 5433) and not sockets.serves(lo, "10.0.0.5", 5432)
    assert sockets.serves(any4, "db.example", 5432) and sockets.serves(any6, "10.0.0.5", 5432)
    assert sockets.serves(mapped, "10.0.0.5", 5432) and not sockets.serves(mapped, "db.example", 5432)


def _proc(root: Path, pid: int, ppid: int, fds: dict[int, str]) -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "stat").write_text(f"{pid} (x y) S {ppid} {pid} {pid} 0 -1 0")
    for fd, target in fds.items():
        os.symlink(target, d / "fd" / str(fd))


def test_holders_and_the_eldest(tmp_path):
    root = tmp_path / "proc"
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text((NET / "tcp").read_text())
    (root / "net" / "unix").write_text((NET / "unix").read_text())
    _proc(root, 1, 0, {})
    _proc(root, 2205, 1, {3: "/dev/null", 5: "socket:[5313]", 6: "socket:[5314]"})   # the postmaster
    _proc(root, 2300, 2205, {5: "socket:[5313]"})           # a child that kept the listening socket
    _proc(root, 2400, 2300, {7: "socket:[5313]"})           # and its child
    _proc(root, 9000, 1, {4: "socket:[9739]"})
    inodes = sockets.tcp_inodes("127.0.0.1", 5432, str(root))
    assert inodes == {5313}
    held = sockets.holders(inodes, proc_root=str(root))
    assert held == {2205, 2300, 2400}
    assert sockets.eldest(held, str(root)) == 2205
    assert sockets.eldest({2205, 9000}, str(root)) is None          # two unrelated holders: nobody
    assert sockets.unix_inodes("/var/run/postgresql/.s.PGSQL.5432", str(root)) == {5314}
    assert identity.socket_holder(("unix", "/var/run/postgresql/.s.PGSQL.5432"), str(root)) == (2205, "")
    assert identity.socket_holder(("tcp", "127.0.0.1", "5999"), str(root)) == (None, "nothing listens on 127.0.0.1 port 5999")
    assert sockets.listening_of(2205, str(root)) == (["/var/run/postgresql/.s.PGSQL.5432"],
                                                     [Listener("127.0.0.1", 5432, 5313)])
