"""databases/bounded.py (calls waited for at most a budget) and databases/identity.py (the server
by fact), on real threads and real processes this test starts."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from dbguard.databases import identity
from dbguard.databases.bounded import BoundedCaller, Busy, Overdue


# --- bounded calls -------------------------------------------------------------------------------
def test_a_call_that_comes_back_gives_its_value_or_its_error():
    calls = BoundedCaller("t")
    assert calls.call(lambda: 42, 1.0) == 42
    with pytest.raises(ZeroDivisionError):
        calls.call(lambda: 1 / 0, 1.0)
    assert calls.running_for() is None


def test_a_stuck_call_is_cut_off_remembered_and_blocks_the_next_until_it_ends():
    calls = BoundedCaller("t")
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(Overdue, match=r"no answer within 0\.2s"):
        calls.call(release.wait, 0.2)
    assert time.monotonic() - started < 5            # the caller got its answer, the worker still waits
    assert calls.running_for() is not None
    with pytest.raises(Busy, match="an earlier call has been running for"):
        calls.call(lambda: 1, 1.0)                     # fails at once, no second stuck thread
    release.set()
    calls.wait(5)
    assert calls.running_for() is None
    assert calls.call(lambda: "next", 1.0) == "next"


# --- identity ------------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    """A process running in a data directory, with a pid file naming it: a server by every fact."""
    data = tmp_path / "data"
    data.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=data)
    (data / "server.pid").write_text(f"{p.pid}\n")
    yield p, data
    p.kill()      # our own child
    p.wait()


def test_the_server_by_fact(server):
    p, data = server
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    assert identity.server_pid(str(data / "server.pid"), str(data)) == (p.pid, "")
    assert identity.server_pid(str(data / "server.pid"), str(data), exe_under=exe_dir, owner_of_datadir=True,
                               peer_pid=p.pid) == (p.pid, "")
    pid, why = identity.server_pid(str(data / "server.pid"), str(data), exe_under="/opt/db")
    assert pid is None and why == f"process {p.pid} runs {os.path.realpath(sys.executable)}, not a server under /opt/db"
    assert identity.why_not_server(p.pid, str(data), peer_pid=1) == f"pid file says {p.pid} but the socket peer is 1"
    # Some other process (this test) named in a pid file is not the server.
    assert identity.why_not_server(os.getpid(), str(data)) == \
        f"process {os.getpid()} does not run in the data directory {data}"


def test_a_stale_pid_file_names_no_server(server, tmp_path):
    p, data = server
    p.kill()
    time.sleep(0.2)       # a zombie until reaped: no cwd, so no server either
    assert identity.why_not_server(p.pid, str(data)) == f"process {p.pid} from the pid file does not exist"
    p.wait()
    assert identity.server_pid(str(data / "server.pid"), str(data))[0] is None
    pid, why = identity.server_pid(str(tmp_path / "missing.pid"), str(data))
    assert pid is None and why.startswith("cannot read pid file") and "No such file" in why
    (tmp_path / "empty.pid").write_text("")
    assert identity.server_pid(str(tmp_path / "empty.pid"), str(data))[0] is None


def test_inspect_reads_exe_and_cwd():
    me = identity.inspect(os.getpid())
    assert me.cwd == os.getcwd() and me.exe == os.path.realpath(sys.executable)
    assert identity.inspect(2**22 + 7) is None
