"""Births, execs and exits of processes as the kernel announces them (the netlink process
connector), so the process table need not list /proc every cycle to learn what changed.

The connector speaks for the initial pid namespace and needs CAP_NET_ADMIN there; where it
cannot be had (a container without it, a kernel without CONFIG_PROC_EVENTS) `open_events`
returns None and the table lists /proc instead. When the kernel drops messages (the socket's
buffer filled during a fork storm) `drain` says so, and the caller lists /proc once to
catch up: an event missed is never a process missed.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
NLMSG_HDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")            # idx, val, seq, ack, len, flags
EVENT_HDR = struct.Struct("=IIQ")            # what, cpu, timestamp_ns
FORK, EXEC, EXIT = 0x1, 0x2, 0x80000000
PIDS = struct.Struct("=IIII")                # fork: parent pid, tgid, child pid, tgid; exec/exit: pid, tgid, ...
RCVBUF = 4 << 20


@dataclass
class Changes:
    """Processes (thread-group leaders) that were born, exec'd or exited since the last drain."""

    born: set[int] = field(default_factory=set)
    execed: set[int] = field(default_factory=set)
    exited: set[int] = field(default_factory=set)
    lost: bool = False          # the kernel dropped events: list /proc to catch up


def parse(data: bytes, into: Changes) -> None:
    """Fold one datagram (one or more netlink messages) into `into`. Threads are left out:
    a thread's fork or exit has pid != tgid. The exit of a main thread (pid == tgid) reads
    the same whether the process ended or only that thread did (pthread_exit)."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length = NLMSG_HDR.unpack_from(data, off)[0]
        if length < NLMSG_HDR.size:
            return
        ev = off + NLMSG_HDR.size + CN_MSG.size
        if ev + EVENT_HDR.size + PIDS.size <= off + length:
            what = EVENT_HDR.unpack_from(data, ev)[0]
            a, b, c, d = PIDS.unpack_from(data, ev + EVENT_HDR.size)
            if what == FORK and c == d:
                into.born.add(d)
                into.exited.discard(d)
            elif what == EXEC and a == b:
                into.execed.add(b)
            elif what == EXIT and a == b:
                into.exited.add(b)
                into.born.discard(b)
                into.execed.discard(b)
        off += (length + 3) & ~3


class ProcEvents:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> Changes:
        out = Changes()
        while True:
            try:
                parse(self.sock.recv(1 << 16), out)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                out.lost = True

    def close(self) -> None:
        self.sock.close()


def _listen_message(op: int) -> bytes:
    payload = struct.pack("=I", op)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn


def open_events(probe_seconds: float = 0.5) -> ProcEvents | None:
    """Subscribe to process events, or None where the kernel does not give them to us.

    The kernel accepts the subscription silently even where it will send nothing (outside
    the initial user and pid namespaces), and its pids are those of the initial pid
    namespace: so a child is forked and its birth must arrive under the pid we know it by."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
    except OSError:
        return None
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        s.bind((0, CN_IDX_PROC))
        s.send(_listen_message(PROC_CN_MCAST_LISTEN))
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        s.settimeout(probe_seconds)
        seen = Changes()
        try:
            while child not in seen.born:
                parse(s.recv(1 << 16), seen)
        except (TimeoutError, socket.timeout):
            s.close()
            return None
        s.setblocking(False)
        return ProcEvents(s)
    except OSError:
        s.close()
        return None
