"""The listening side over ThreadingHTTPServer: a selector loop at the door
(server.http.acceptor), at most `--threads-http` handler threads (server.http.workers), the
count of requests in flight (for the drain), the size and time limits every connection uses.

A connection holds a handler thread only while a request is being handled: heads (and small
bodies) are read by the door's loop, idle kept-alive connections wait there, and a handler
thread gives its connection back after each answer. http.server's handler classes serve each
request as before (server.http.connection, server.http.routes).

Time limits: a request's head must arrive within `--timeout-head` of its first byte (408);
its body within `-to/--timeout` of it (408); an idle kept-alive connection closes after
KEEP_ALIVE_TIMEOUT seconds (or the timeout if shorter), as cpp-httplib does for llama-server.
Writes time out after `--timeout` per send.
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

from ..config.cli_http import CORS_HEADERS, CORS_METHODS, TIMEOUT_HEAD
from .acceptor import Acceptor, Arrival, to_json
from .disconnect import DisconnectWatcher
from .workers import HandlerPool

log = logging.getLogger("server.http")

MAX_BODY = 8 * 1024 * 1024        # bytes of a request body before 413
KEEP_ALIVE_TIMEOUT = 5.0          # seconds an idle connection may wait for its next request
FD_RESERVE = 128                  # file descriptors kept for the model, logs, slot files, ...
# A body left unread (413, or a large body an error answered before reading) is read and
# dropped after the answer, up to these bounds, before the connection closes: closing with
# unread bytes would send a reset, and a client still sending (http.client sends the whole body
# before it reads) would get a broken pipe instead of the answer.
LINGER_SECONDS = 5.0
LINGER_BYTES = 8 * MAX_BODY
LOCALHOST_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}

def connection_limit() -> int:
    """Most connections open at once: the file-descriptor limit (raised to its hard limit)
    less a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(16, soft - FD_RESERVE)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of connections waits in the kernel, not in SYN retries

    def __init__(self, addr, handler: type[BaseHTTPRequestHandler], service,
                 api_key: str | Sequence[str] | None = None,
                 static_root: str | None = None, timeout: float = 600.0,
                 threads_http: int = 64, timeout_head: float = TIMEOUT_HEAD,
                 max_connections_per_ip: int = 0, cors_origins: list[str] | None = None,
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
        self.watcher = DisconnectWatcher()
        super().__init__(addr, handler)
        self.pool = HandlerPool(threads_http, self._serve)
        self.acceptor = Acceptor(
            self.socket, self.pool.submit, head_timeout=min(timeout_head, timeout),
            body_timeout=timeout, keep_alive=min(KEEP_ALIVE_TIMEOUT, timeout),
            max_conns=connection_limit(), max_per_ip=max_connections_per_ip)
        self._serving = False

    # -- the door's loop and the handler threads --------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the door's loop (server.http.acceptor) until shutdown()."""
        self._serving = True
        self.acceptor.run()

    def shutdown(self) -> None:
        """Stop the loop and wait for it; idle connections are closed, requests in flight end."""
        self.acceptor.stop()
        if self._serving:
            self.acceptor.stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        pool = getattr(self, "pool", None)  # None: the bind failed (socketserver closes then)
        if pool is not None:
            pool.close()

    def _serve(self, arrival: Arrival):
        """On a handler thread: one request. Returns what gives a kept-alive connection back to
        the door: the pool runs it once this thread counts as idle, so that the connection's
        next request finds this thread free instead of starting another."""
        leftover = None
        try:
            handler = self.RequestHandlerClass(arrival, arrival.addr, self)
            leftover = handler.kept_alive
        except Exception:
            log.exception("error while serving %s", arrival.addr[0])
        if leftover is None:
            self.shutdown_request(arrival.sock)
            self.acceptor.closed(arrival.addr)
            return None
        return lambda: self.acceptor.park(arrival.sock, arrival.addr, leftover)

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
