"""One connection's requests over http.server: the read deadline set up, http.server's own
errors as JSON, answers out (JSON, bytes, server-sent events over chunked encoding) with CORS
headers, and a lingering close when a body was left unread."""

from __future__ import annotations

import io
import logging
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from ..api.shapes import Event
from ..api.stream import DONE, PING
from ..errors import ApiError, error_body
from .acceptor import SMALL_BODY
from .bodies import BodyReader, DeadlineReader
from .transport import LINGER_BYTES, LINGER_SECONDS, LOCALHOST_NAMES, Server, to_json

log = logging.getLogger("server.http")


class Connection(BodyReader, BaseHTTPRequestHandler):
    """One connection's reading and writing: bodies in, JSON, bytes and SSE out, with CORS
    headers and http.server's own errors as JSON. Endpoints are in server.http.routes.Handler."""

    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "pyllama-server"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    _body_done = False  # the request's body was read, or need not be

    disable_nagle_algorithm = True  # TCP_NODELAY: no wait for the client's delayed ACK
    kept_alive: bytes | None = None  # after the request: the leftover bytes of a connection kept open

    def setup(self) -> None:
        """The request arrived through the door (server.http.acceptor.Arrival): its bytes read
        so far come first, then the socket, within the time-out from its first byte."""
        arrival = self.request
        self.request = arrival.sock
        self.framing = arrival.head  # the body's length or coding, as server.http.heads read it
        self.timeout = self.server.io_timeout  # socket timeout for writes (and reads, see below)
        super().setup()
        self._reader = DeadlineReader(self.connection, self.server.io_timeout, arrival.data,
                                      arrival.started + self.server.io_timeout)
        self.rfile = io.BufferedReader(self._reader, 65536)

    def handle(self) -> None:
        """One request; finish() then hands a kept-alive connection back to the door."""
        done = False
        try:
            self.handle_one_request()
            done = True
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client dropped its connection: nothing to answer, nothing to log
        finally:
            if not done:
                self.close_connection = True

    _linger = False  # the connection closes with a request body unread: see LINGER_SECONDS

    def finish(self) -> None:
        keep = not (self.close_connection or self._linger or self.server.service.closing)
        leftover = self._reader.leftover(self.rfile) if keep else b""
        super().finish()  # flushes the answer
        if self._linger:
            linger_close(self.connection)
        elif keep:
            self.kept_alive = leftover  # Server._serve hands the connection back to the door

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
        if self.framing.chunked:
            self.close_connection = True
            return
        n = self.framing.content_length or 0
        if n == 0:
            return
        if 0 < n <= SMALL_BODY:  # read by the door already: draining it costs nothing
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
        self.send_header_end(data if self.command != "HEAD" else b"")

    def send_header_end(self, body: bytes = b"") -> None:
        """End the head and send it with the body in one write (one segment for small answers)."""
        self._headers_buffer.append(b"\r\n")
        if body:
            self._headers_buffer.append(body)
        self.flush_headers()

    def send_api_error(self, e: ApiError, shape=None) -> None:
        """`shape(e)`: the error body of the route's wire format (default llama-server's)."""
        self.send_json(e.status, shape(e) if shape is not None else e.body(), e.headers)

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
                elif ev is PING:  # llama-server's keep-alive: an SSE comment
                    data = b":\n\n"
                elif isinstance(ev, Event):  # a named event (Anthropic's streams)
                    data = b"event: %s\ndata: %s\n\n" % (ev.name.encode(), to_json(ev.data))
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
