"""A small HTTP/1.1 GET server for /metrics and /healthz: one thread, bounded connections.

Anyone on the host can connect to the metrics port. A thread per connection (the standard
library's ThreadingHTTPServer) lets a local user holding idle connections grow dbguard's
threads without bound, until a thread the daemon needs cannot start. Here one thread serves
every connection from a selector; a connection idle for IDLE_TIMEOUT seconds is closed, and
past MAX_CONNECTIONS the one idle longest is closed for the newcomer, so a scraper that sends
its request at once is always served. Each response closes its connection.
"""
from __future__ import annotations

import selectors
import socket
import threading
import time
from typing import Callable

MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 10.0
MAX_REQUEST = 8192          # request line and headers; a GET has no body

# (path) -> (status, content type, body)
Handler = Callable[[str], "tuple[int, str, bytes]"]

# The statuses this server and its handler answer with (RFC 9110). http.HTTPStatus would be
# every status as an enum: 0.1 MiB of the daemon's memory for these six lines.
PHRASES = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


class _Conn:
    __slots__ = ("sock", "inbox", "outbox", "touched", "answered")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = b""
        self.outbox = b""
        self.touched = time.monotonic()
        self.answered = False


def _response(status: int, ctype: str, body: bytes, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {PHRASES.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


class HttpServer:
    def __init__(self, host: str, port: int, handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT):
        """Listens at once (OSError when it cannot); serves from a daemon thread."""
        self.handler = handler
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._conns: dict[socket.socket, _Conn] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dbguard-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._sel.close()
        self._listener.close()

    # --- the loop ------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._sel.select(timeout=0.2):
                if key.data is None:
                    self._accept()
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                elif mask & selectors.EVENT_WRITE:
                    self._write(key.data)
            cutoff = time.monotonic() - self.idle_timeout
            for conn in [c for c in self._conns.values() if c.touched < cutoff]:
                self._drop(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError:         # out of file descriptors: make room, try again next round
                if self._conns:
                    self._drop(min(self._conns.values(), key=lambda c: c.touched))
                return
            if len(self._conns) >= self.max_connections:
                self._drop(min(self._conns.values(), key=lambda c: c.touched))
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if conn.answered:
            return                  # the client's leftovers, read so closing does not reset the reply
        conn.inbox += data
        conn.touched = time.monotonic()
        if b"\r\n\r\n" not in conn.inbox and b"\n\n" not in conn.inbox:
            if len(conn.inbox) > MAX_REQUEST:
                self._reply(conn, _response(431, "text/plain", b"request too large\n"))
            return
        line = conn.inbox.split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) < 2 or line[0] not in ("GET", "HEAD"):
            self._reply(conn, _response(405, "text/plain", b"dbguard: GET /metrics or /healthz\n"))
            return
        try:
            status, ctype, body = self.handler(line[1].split("?", 1)[0])
        except Exception as e:      # a broken page must not end the server
            status, ctype, body = 500, "text/plain", f"dbguard: {type(e).__name__}\n".encode()
        self._reply(conn, _response(status, ctype, body, head_only=line[0] == "HEAD"))

    def _reply(self, conn: _Conn, data: bytes) -> None:
        conn.outbox = data
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbox = conn.outbox[n:]
        conn.touched = time.monotonic()
        if not conn.outbox:
            # Half-close and wait for the client's EOF (or the idle timeout): closing a socket
            # with unread input sends a reset that can discard the reply before it is read.
            conn.answered = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
                self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            except OSError:
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
