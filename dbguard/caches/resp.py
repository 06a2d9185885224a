"""A minimal Redis/Valkey client (RESP2 over TCP or a unix socket): what dbguard sends is a
handful of commands (AUTH, INFO, CONFIG SET, MEMORY PURGE), so a 60-line client with a
timeout on every read beats a dependency. A password is sent, never kept or logged."""
from __future__ import annotations

import socket

from .endpoint import Endpoint


class RespError(Exception):
    """The server answered with an error reply (-ERR, -NOPERM, ...): its one line."""


class Resp:
    def __init__(self, ep: Endpoint, timeout: float):
        if ep.kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: object = ep.path
        else:
            info = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)[0]
            self.sock = socket.socket(info[0], socket.SOCK_STREAM)
            where = info[4]
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(where)
        except OSError:
            self.sock.close()
            raise
        self.f = self.sock.makefile("rb")

    def call(self, *args: str | bytes | int):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self):
        line = self.f.readline(1 << 20)
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by the server" if not line else "malformed reply")
        tag, body = line[:1], line[1:-2]
        if tag == b"+":
            return body.decode(errors="replace")
        if tag == b"-":
            raise RespError(body.decode(errors="replace").splitlines()[0][:300] if body else "error")
        if tag == b":":
            return int(body)
        if tag == b"$":
            n = int(body)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed in a reply")
            return data[:-2].decode(errors="replace")
        if tag == b"*":
            n = int(body)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"unexpected reply type {tag!r}")

    def close(self) -> None:
        for x in (self.f, self.sock):
            try:
                x.close()
            except OSError:
                pass
