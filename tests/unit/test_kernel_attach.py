"""The kernel path's start beside the daemon's (dbguard.kernel.attach, kernel.loader.Loading):
how the loader child's words are read without waiting, and what the daemon says meanwhile.
The child itself (BCC, the kernel) is exercised in tests/e2e/test_bpf_late_attach.py."""
from __future__ import annotations

import json
import os
import socket
import time

from dbguard.config import from_dict
from dbguard.kernel.attach import COMPILING, LOADING, KernelStart
from dbguard.kernel.loader import PROGRESS, Loading, attached_note


def _loading(compiling: bool) -> tuple[Loading, socket.socket]:
    """A Loading on a socket pair, without a child: the test speaks as the child."""
    ours, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ld = Loading.__new__(Loading)
    ld.started, ld.compiling, ld._answer, ld._sock = time.monotonic(), compiling, None, ours
    return ld, child


def test_done_reads_the_compile_word_then_the_answer_with_its_descriptors():
    ld, child = _loading(compiling=False)
    assert not ld.done()                          # nothing said yet: not done, and no wait
    child.send(PROGRESS)
    assert not ld.done() and ld.compiling         # the cache was missed: compiling now
    r, w = os.pipe()
    socket.send_fds(child, [json.dumps({"maps": {}}).encode()], [r])
    assert ld.done() and ld.done()
    msg, fds = ld._answer
    assert json.loads(msg) == {"maps": {}} and len(fds) == 1
    for fd in (*fds, r, w):
        os.close(fd)
    child.close()
    ld._sock.close()


def test_a_child_gone_without_an_answer_is_done():
    ld, child = _loading(compiling=True)
    child.close()
    assert ld.done() and ld._answer == (b"", [])
    ld._sock.close()


def test_the_kernel_path_off_says_so_and_waits_on_nothing():
    k = KernelStart(from_dict({"bpf": {"enabled": False}}))
    assert k.loading is None and not k.ready() and k.fileno() is None
    assert k.describe() == "BPF path off ([bpf] enabled = false)"


def test_what_the_start_record_says_while_the_child_works():
    k = KernelStart.__new__(KernelStart)
    k.loading, _ = _loading(compiling=True)
    assert k.describe().startswith(COMPILING + " (") and "user-space path protects" in k.describe()
    k.loading.compiling = False
    assert k.describe().startswith(LOADING)
    k.loading._sock.close()


def test_the_attached_note_says_whether_clang_ran():
    assert attached_note(True) == "BPF path active (programs from the compile cache)"
    assert attached_note(False) == "BPF path active (programs compiled)"


def test_the_daemon_side_of_the_kernel_path_does_not_map_libcrypto():
    """The daemon starts the loader and reads the cache's file names, never objcache (its
    hashlib maps libcrypto into the long-lived process): a fresh interpreter as the daemon's."""
    import subprocess
    import sys
    code = ("import sys, tempfile, dbguard.daemon, dbguard.kernel.attach, dbguard.kernel.bpf, dbguard.kernel.feed\n"
            "from dbguard.kernel.loader import Loading\n"
            "Loading(64, 64, tempfile.mkdtemp()).cancel()      # what the daemon runs to start it\n"
            "print(sorted(m for m in ('_hashlib', 'dbguard.kernel.objcache') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"
