"""The listening side over ThreadingHTTPServer: a bounded number of handler threads, the
count of requests in flight (for the drain), the size and time limits every connection uses.

One handler thread per connection (daemon threads), at most `--threads-http` of them: when
all are taken, a new connection waits up to ACCEPT_WAIT seconds for one, then gets 503 with
Retry-After.

Time limits (`-to/--timeout`): once a request's first byte has arrived, its request line,
headers and body must all arrive within the timeout (a client that trickles bytes is cut off:
408 while the body is read, a closed connection while the head is; server.http.bodies); an
idle connection is closed after KEEP_ALIVE_TIMEOUT seconds (or the timeout if shorter), as
cpp-httplib does for llama-server. Writes time out after `--timeout` per send.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

from ..config.cli import CORS_HEADERS, CORS_METHODS
from ..errors import error_body
from .disconnect import DisconnectWatcher

log = logging.getLogger("server.http")

MAX_BODY = 8 * 1024 * 1024        # bytes of a request body before 413
KEEP_ALIVE_TIMEOUT = 5.0          # seconds an idle connection may wait for its next request
ACCEPT_WAIT = 0.25                # seconds a new connection waits for a free handler thread
# A body left unread (413, or a large body an error answered before reading) is read and
# dropped after the answer, up to these bounds, before the connection closes: closing with
# unread bytes would send a reset, and a client still sending (http.client sends the whole body
# before it reads) would get a broken pipe instead of the answer.
LINGER_SECONDS = 5.0
LINGER_BYTES = 8 * MAX_BODY
LOCALHOST_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}

def to_json(obj) -> bytes:
    """A body or an event as llama-server writes it: UTF-8, no space after separators."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler: type[BaseHTTPRequestHandler], service,
                 api_key: str | Sequence[str] | None = None,
                 static_root: str | None = None, timeout: float = 600.0,
                 threads_http: int = 64, cors_origins: list[str] | None = None,
                 cors_methods: str = CORS_METHODS, cors_headers: str = CORS_HEADERS,
                 cors_credentials: bool = True):
        self.service = service  # server.service.Service: what the handler's endpoints call
        # one key, or several (llama-server's --api-key a,b / --api-key-file): any one opens
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        self.api_keys = [k.encode() for k in keys if k]
        self.api_key = self.api_keys[0] if self.api_keys else None
        self.static_root = Path(static_root).resolve() if static_root else None
        self.io_timeout = timeout
        # CORS stays off without origins; "*" allows any origin (echoed back when credentials
        # are allowed, as llama-server), "localhost" any http(s) origin on this machine
        # (each entry may be llama-server's comma-separated list)
        self.cors_origins = [o.strip() for x in (cors_origins or []) for o in x.split(",") if o.strip()]
        self.cors_methods = cors_methods
        self.cors_headers = cors_headers
        self.cors_credentials = cors_credentials
        self.active = 0
        self.active_cond = threading.Condition()
        self._handler_slots = threading.BoundedSemaphore(threads_http)
        self.watcher = DisconnectWatcher()
        super().__init__(addr, handler)

    # -- a bounded number of handler threads ----------------------------------------------

    def process_request(self, request, client_address) -> None:
        if not self._handler_slots.acquire(timeout=ACCEPT_WAIT):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._handler_slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._handler_slots.release()

    def _refuse(self, sock: socket.socket) -> None:
        """All handler threads are busy: a short 503 from the accepting thread, then close."""
        body = to_json(error_body(503, "unavailable_error", "too many connections; retry later"))
        head = (b"HTTP/1.1 503 Service Unavailable\r\nServer: pyllama-server\r\n"
                b"Content-Type: application/json; charset=utf-8\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        try:
            sock.settimeout(0.5)
            try:
                sock.recv(65536, socket.MSG_DONTWAIT)  # what came already: no RST on close
            except OSError:
                pass
            sock.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(sock)

    def begin(self) -> None:
        with self.active_cond:
            self.active += 1

    def end(self) -> None:
        with self.active_cond:
            self.active -= 1
            self.active_cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait (without spinning) until no request is being handled; False on timeout."""
        with self.active_cond:
            return self.active_cond.wait_for(lambda: self.active == 0, timeout)


class Server6(Server):
    """The same server on an AF_INET6 socket (http.server binds IPv4 only); with several
    --host addresses, :: binds IPv6 only, as upstream."""

    address_family = socket.AF_INET6

    def __init__(self, *args, v6only: bool = False, **kw):
        self.v6only = v6only  # before super().__init__, which binds
        super().__init__(*args, **kw)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self.v6only))
        super().server_bind()
