"""HTTP transport over ThreadingHTTPServer: bounded threads, read deadlines, bodies in, answers out.

One handler thread per connection (daemon threads), at most `--threads-http` of them: when
all are taken, a new connection waits up to ACCEPT_WAIT seconds for one, then gets 503 with
Retry-After.

Time limits (`-to/--timeout`): once a request's first byte has arrived, its request line,
headers and body must all arrive within the timeout (a client that trickles bytes is cut off:
408 while the body is read, a closed connection while the head is); an idle connection is
closed after KEEP_ALIVE_TIMEOUT seconds (or the timeout if shorter), as cpp-httplib does for
llama-server. Writes time out after `--timeout` per send.

Bodies: Content-Length or `Transfer-Encoding: chunked` (de-chunked here), at most MAX_BODY.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from .disconnect import DisconnectWatcher
from ..errors import ApiError, bad_request, error_body
from ..api.stream import DONE

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
# CORS defaults (llama-server's --cors-methods / --cors-headers)
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "*"
LOCALHOST_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}


def to_json(obj) -> bytes:
    """A body or an event as llama-server writes it: UTF-8, no space after separators."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class _SocketReader(io.RawIOBase):
    """The raw side of a handler's rfile: every recv gets at most what is left of the
    request's deadline (set when its first byte arrived), or the idle time-out before that."""

    def __init__(self, sock: socket.socket, io_timeout: float):
        self.sock = sock
        self.io_timeout = io_timeout
        self.idle_timeout = min(KEEP_ALIVE_TIMEOUT, io_timeout)
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.deadline is None:
            wait = self.idle_timeout
        else:
            wait = self.deadline - time.monotonic()
            if wait <= 0:
                raise socket.timeout("the request did not arrive within the time-out")
        self.sock.settimeout(wait)
        try:
            n = self.sock.recv_into(b)
        finally:
            self.sock.settimeout(self.io_timeout)  # writes keep the plain per-send time-out
        if self.deadline is None and n:
            self.deadline = time.monotonic() + self.io_timeout
        return n


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


class Connection(BaseHTTPRequestHandler):
    """One connection's reading and writing: bodies in, JSON, bytes and SSE out, with CORS
    headers and http.server's own errors as JSON. Endpoints are in server.http.Handler."""

    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "pyllama-server"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    _body_done = False  # the request's body was read, or need not be

    def setup(self) -> None:
        self.timeout = self.server.io_timeout  # socket timeout for writes (and reads, see below)
        super().setup()
        self._reader = _SocketReader(self.connection, self.server.io_timeout)
        self.rfile = io.BufferedReader(self._reader, 65536)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path" alone: no headers; refused
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        return True

    def handle_one_request(self) -> None:
        self._reader.deadline = None  # the time-out runs from the request's first byte
        try:
            super().handle_one_request()
        except (ConnectionResetError, BrokenPipeError):
            # the client dropped its (kept-alive) connection: nothing to answer, nothing to log
            self.close_connection = True

    _linger = False  # the connection closes with a request body unread: see LINGER_SECONDS

    def finish(self) -> None:
        super().finish()  # flushes the answer
        if self._linger:
            linger_close(self.connection)

    # -- logging / errors from http.server ------------------------------------------------

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def log_request(self, code="-", size="-") -> None:
        if isinstance(code, HTTPStatus):
            code = code.value
        log.info("%s \"%s\" %s", self.client_address[0], self.requestline[:200], code)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, ...) as JSON."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line and headers
        type_ = {404: "not_found_error", 501: "not_supported_error"}.get(code, "invalid_request_error")
        self._body_done = True
        try:
            self.send_json(code, error_body(code, type_, message or HTTPStatus(code).phrase))
        except OSError:
            pass

    # -- writing ------------------------------------------------------------------------------

    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        data = to_json(obj)
        self.send_bytes(status, data, "application/json; charset=utf-8", headers)

    def _settle_body(self) -> None:
        """Before answering: a request body nobody read is drained when small, else the
        connection is closed after the answer (its bytes must not be read as a next request)."""
        if self._body_done:
            return
        self._body_done = True
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return
        if self.command in ("GET", "HEAD", "OPTIONS", "DELETE") and self.headers.get("Content-Length") is None:
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n == 0:
            return
        if 0 < n <= 65536:
            try:
                self.rfile.read(n)
                return
            except OSError:
                pass
        self.close_connection = self._linger = True

    def cors_headers(self) -> dict:
        """Access-Control-Allow-Origin only with --cors-origin(s), and only for an allowed
        origin: a listed one, any with "*" (echoed when credentials are allowed, as
        llama-server, else "*"), or with "localhost" one whose host is localhost, 127.0.0.1
        or [::1] (any port)."""
        allowed = self.server.cors_origins
        hdrs = getattr(self, "headers", None)
        origin = hdrs.get("Origin") if hdrs is not None else None
        if not allowed or not origin:
            return {}
        if "*" in allowed:
            if self.server.cors_credentials:
                return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            return {"Access-Control-Allow-Origin": "*"}
        if origin in allowed or ("localhost" in allowed and origin_is_localhost(origin)):
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    def send_bytes(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        self._settle_body()
        self.send_response(status)
        for k, v in self.cors_headers().items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_api_error(self, e: ApiError) -> None:
        self.send_json(e.status, e.body(), e.headers)

    def send_stream(self, events) -> None:
        """Server-sent events over chunked transfer encoding. Closing `events` cancels the job."""
        self._settle_body()
        self.send_response(200)
        for k, v in self.cors_headers().items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for ev in events:
                if ev is DONE:
                    data = b"data: [DONE]\n\n"
                else:
                    data = b"data: %s\n\n" % to_json(ev)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError) as e:
            log.info("client %s went away during a stream (%s); request cancelled",
                     self.client_address[0], type(e).__name__)
            self.close_connection = True
        finally:
            events.close()

    # -- reading ------------------------------------------------------------------------------

    def read_json(self):
        self._body_done = True
        try:
            data = self._read_body()
        except (socket.timeout, TimeoutError):
            self.close_connection = True
            raise ApiError(408, "invalid_request_error",
                           f"the request body did not arrive within {self.server.io_timeout:g} s") from None
        try:
            text = data.decode("utf-8")
            return json.loads(text, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise bad_request("the request body is not valid UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None

    def _read_chunked(self) -> bytes:
        """A `Transfer-Encoding: chunked` body, de-chunked, at most MAX_BODY bytes."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                self.close_connection = True
                raise bad_request("malformed chunked body: bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16:
                    raise ValueError
                size = int(size_text, 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise bad_request("malformed chunked body: bad chunk size") from None
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                self.close_connection = self._linger = True
                raise ApiError(413, "invalid_request_error",
                               f"request body over the limit of {MAX_BODY} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                self.close_connection = True
                raise bad_request("malformed chunked body: a chunk is cut short")
            parts.append(chunk)
        for _ in range(64):  # trailer fields, then the empty line
            line = self.rfile.readline(8194)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        self.close_connection = True
        raise bad_request("malformed chunked body: bad trailer")

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te is not None:
            if te.strip().lower() != "chunked" or self.headers.get("Content-Length") is not None:
                self.close_connection = True
                raise bad_request("unsupported Transfer-Encoding (only 'chunked', without Content-Length)")
            return self._read_chunked()
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            self.close_connection = True
            raise ApiError(411, "invalid_request_error", "Content-Length is required")
        try:
            n = int(raw_len)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise bad_request("Content-Length is not a valid length") from None
        if n > MAX_BODY:
            self.close_connection = self._linger = True  # the body is not read: no next request
            raise ApiError(413, "invalid_request_error",
                           f"request body of {n} bytes is over the limit of {MAX_BODY} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise bad_request("the request body is shorter than its Content-Length")
        return data


def linger_close(sock: socket.socket) -> None:
    """After the answer: say we are done writing, then read and drop what the client still
    sends until it closes, at most LINGER_BYTES within LINGER_SECONDS (a lingering close), so
    the answer is not lost to a reset."""
    deadline, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
    try:
        sock.shutdown(socket.SHUT_WR)
        while left > 0:
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            sock.settimeout(wait)
            data = sock.recv(min(left, 262144))
            if not data:
                break
            left -= len(data)
    except OSError:
        pass


def origin_is_localhost(origin: str) -> bool:
    """An http(s) origin whose host is localhost, 127.0.0.1 or [::1], any port (llama-server's
    --cors-origins localhost)."""
    try:
        u = urlsplit(origin)
        host = u.hostname
        u.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError:
        return False
    return u.scheme in ("http", "https") and host in LOCALHOST_NAMES
