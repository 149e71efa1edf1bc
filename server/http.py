"""HTTP: routing, auth, JSON bodies, SSE streams and static files over ThreadingHTTPServer.

One handler thread per connection (daemon threads), at most `--threads-http` of them: when
all are taken, a new connection waits up to ACCEPT_WAIT seconds for one, then gets 503 with
Retry-After. A handler reads and checks the request, calls the Service, and writes JSON or a
stream of server-sent events; it never touches the model beyond the tokenizer.

Time limits (`-to/--timeout`): once a request's first byte has arrived, its request line,
headers and body must all arrive within the timeout (a client that trickles bytes is cut off:
408 while the body is read, a closed connection while the head is); an idle connection is
closed after KEEP_ALIVE_TIMEOUT seconds (or the timeout if shorter), as cpp-httplib does for
llama-server. Writes time out after `--timeout` per send.

Bodies: Content-Length or `Transfer-Encoding: chunked` (de-chunked here), at most MAX_BODY.

Vanishing clients: while a generation runs, the client's socket is watched by one thread
(`DisconnectWatcher`, a selector over every waiting socket): when the peer closes, the
engine request is cancelled at once (queued, prefilling, or generating; streamed or not) and
its slot freed at the engine's next step. A stream also notices at the next failed write.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import io
import json
import logging
import mimetypes
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

from . import api
from .api import ApiError
from .service import DONE, ClientGone, Service

log = logging.getLogger("server.http")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY = 8 * 1024 * 1024        # bytes of a request body before 413
KEEP_ALIVE_TIMEOUT = 5.0          # seconds an idle connection may wait for its next request
ACCEPT_WAIT = 0.25                # seconds a new connection waits for a free handler thread
PUBLIC_PATHS = {"/health", "/v1/health"}
BUILTIN_PAGE_PATHS = {"/", "/index.html"}  # the chat page: no data, open without the key
# llama-server's web UI serves these without the key; we do not have them, so with
# --api-key they answer 404 (not 401) like any missing page
UPSTREAM_UI_ASSETS = {"/sw.js", "/manifest.webmanifest", "/_app/version.json", "/favicon.ico"}
PROCESS_START = int(time.time())  # /metrics' Process-Start-Time-Unix header
# CORS defaults (llama-server's --cors-methods / --cors-headers)
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "*"
LOCALHOST_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}

# path -> {method: (handler method name, kind)}
ROUTES: dict[str, dict[str, tuple[str, str | None]]] = {
    "/health": {"GET": ("h_health", None)},
    "/v1/health": {"GET": ("h_health", None)},
    "/props": {"GET": ("h_props", None), "POST": ("h_set_props", None)},
    "/slots": {"GET": ("h_slots", None)},
    "/metrics": {"GET": ("h_metrics", None)},
    "/models": {"GET": ("h_models", None)},
    "/v1/models": {"GET": ("h_models", None)},
    "/tokenize": {"POST": ("h_tokenize", None)},
    "/detokenize": {"POST": ("h_detokenize", None)},
    "/completion": {"POST": ("h_generate", api.KIND_COMPLETION)},
    "/completions": {"POST": ("h_generate", api.KIND_COMPLETION)},
    "/v1/completions": {"POST": ("h_generate", api.KIND_OAI_COMPLETION)},
    "/chat/completions": {"POST": ("h_generate", api.KIND_OAI_CHAT)},
    "/v1/chat/completions": {"POST": ("h_generate", api.KIND_OAI_CHAT)},
    "/apply-template": {"POST": ("h_apply_template", None)},
    "/chat/completions/input_tokens": {"POST": ("h_input_tokens", None)},
    "/v1/chat/completions/input_tokens": {"POST": ("h_input_tokens", None)},
    "/infill": {"POST": ("h_infill", None)},
}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class DisconnectWatcher:
    """One thread that notices peers closing their connection while their request runs.

    `watch(sock, callback)` registers a socket; when it turns readable and a peek reads EOF
    (or an error), `callback()` runs once (it cancels the engine request). Readable with data
    (a pipelined next request) just ends the watch. The thread blocks in select() (no
    timeout, no polling); changes reach it through a socketpair.
    """

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._next = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="http-disconnect-watch", daemon=True)
        self._thread.start()

    def _post(self, op) -> None:
        with self._lock:
            self._ops.append(op)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the thread is awake already

    @contextlib.contextmanager
    def watch(self, sock: socket.socket, callback):
        with self._lock:
            self._next += 1
            token = self._next
        self._post(("add", token, sock, callback))
        try:
            yield
        finally:
            self._post(("del", token, sock, None))

    def close(self) -> None:
        self._closed = True
        self._post(("stop", 0, None, None))
        self._thread.join(5)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        by_token: dict[int, socket.socket] = {}
        while not self._closed:
            for key, _ in self._sel.select():
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                token, sock, callback = key.data
                try:
                    peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue  # spurious wake-up
                except OSError:
                    peek = b""  # reset by the peer: gone too
                self._forget(by_token, token)
                if peek == b"":
                    try:
                        callback()
                    except Exception:
                        log.exception("disconnect callback failed")
            while True:
                with self._lock:
                    if not self._ops:
                        break
                    op, token, sock, callback = self._ops.popleft()
                if op == "add":
                    try:
                        self._sel.register(sock, selectors.EVENT_READ, (token, sock, callback))
                        by_token[token] = sock
                    except (ValueError, KeyError, OSError):
                        pass  # closed already, or watched twice: nothing to watch
                elif op == "del":
                    self._forget(by_token, token)

    def _forget(self, by_token: dict, token: int) -> None:
        sock = by_token.pop(token, None)
        if sock is not None:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass


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

    def __init__(self, addr, service: Service, api_key: str | Sequence[str] | None = None,
                 static_root: str | None = None, timeout: float = 600.0,
                 threads_http: int = 64, cors_origins: list[str] | None = None,
                 cors_methods: str = CORS_METHODS, cors_headers: str = CORS_HEADERS,
                 cors_credentials: bool = True):
        self.service = service
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
        self.threads_http = threads_http
        self._handler_slots = threading.BoundedSemaphore(threads_http)
        self.n_refused = 0
        self.watcher = DisconnectWatcher()
        super().__init__(addr, Handler)

    # -- a bounded number of handler threads ----------------------------------------------

    def process_request(self, request, client_address) -> None:
        if not self._handler_slots.acquire(timeout=ACCEPT_WAIT):
            self.n_refused += 1
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
        body = json.dumps(api.error_body(503, "unavailable_error",
                                         "too many connections; retry later")).encode()
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


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "pyllama-server"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

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
        super().handle_one_request()

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
            self.send_json(code, api.error_body(code, type_, message or HTTPStatus(code).phrase))
        except OSError:
            pass

    # -- writing ------------------------------------------------------------------------------

    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
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
        self.close_connection = True

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
                    data = b"data: " + json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n\n"
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
            raise api.bad_request("the request body is not valid UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise api.bad_request(f"the request body is not valid JSON: {e}") from None

    def _read_chunked(self) -> bytes:
        """A `Transfer-Encoding: chunked` body, de-chunked, at most MAX_BODY bytes."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1026)
            if not line.endswith(b"\n"):
                self.close_connection = True
                raise api.bad_request("malformed chunked body: bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16:
                    raise ValueError
                size = int(size_text, 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise api.bad_request("malformed chunked body: bad chunk size") from None
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "invalid_request_error",
                               f"request body over the limit of {MAX_BODY} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                self.close_connection = True
                raise api.bad_request("malformed chunked body: a chunk is cut short")
            parts.append(chunk)
        for _ in range(64):  # trailer fields, then the empty line
            line = self.rfile.readline(8194)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        self.close_connection = True
        raise api.bad_request("malformed chunked body: bad trailer")

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te is not None:
            if te.strip().lower() != "chunked" or self.headers.get("Content-Length") is not None:
                self.close_connection = True
                raise api.bad_request("unsupported Transfer-Encoding (only 'chunked', without Content-Length)")
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
            raise api.bad_request("Content-Length is not a valid length") from None
        if n > MAX_BODY:
            self.close_connection = True  # the body is not read: the connection cannot go on
            raise ApiError(413, "invalid_request_error",
                           f"request body of {n} bytes is over the limit of {MAX_BODY} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise api.bad_request("the request body is shorter than its Content-Length")
        return data

    # -- dispatch -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def do_DELETE(self) -> None:
        self.dispatch()

    def do_PATCH(self) -> None:
        self.dispatch()

    def do_OPTIONS(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        self.server.begin()
        try:
            self._dispatch()
        finally:
            self.server.end()

    def _dispatch(self) -> None:
        self._body_done = False
        path = urlsplit(self.path).path
        if self.server.service.closing:
            self.close_connection = True
        try:
            self.route(path)
        except ApiError as e:
            self.send_api_error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except ClientGone:
            self.close_connection = True
            log.info("client %s went away; its request was cancelled", self.client_address[0])
        except Exception as e:  # a bug: answer 500 and keep serving
            log.exception("error while handling %s %s", self.command, path)
            self.close_connection = True
            try:
                self.send_json(500, api.error_body(500, "server_error", f"internal error: {type(e).__name__}"))
            except OSError:
                pass

    def route(self, path: str) -> None:
        svc = self.server.service
        route = ROUTES.get(path)
        if self.command == "OPTIONS":
            # browsers send no credentials with a preflight: answered before the key check
            if self.server.cors_origins:
                return self.preflight()
            if route is None:
                raise ApiError(404, "not_found_error", "File Not Found")
            raise ApiError(405, "invalid_request_error",
                           f"method OPTIONS is not allowed on {path} (CORS is off: see --cors-origin)",
                           headers={"Allow": ", ".join(sorted(route))})
        is_page = route is None and self.command in ("GET", "HEAD")
        webui = bool(getattr(svc.settings, "webui", True))
        if is_page and not webui:
            raise ApiError(404, "not_found_error", "File Not Found")
        if is_page and not self.server.static_root and path in UPSTREAM_UI_ASSETS:
            raise ApiError(404, "not_found_error", "File Not Found")
        if path not in PUBLIC_PATHS and not (is_page and path in BUILTIN_PAGE_PATHS and not self.server.static_root):
            self.check_auth()
        if not svc.ready and path not in PUBLIC_PATHS and not is_page:
            raise ApiError(503, "unavailable_error",
                           "the server is shutting down" if svc.closing else "Loading model")
        if route is None:
            if is_page:
                return self.serve_static(path)
            raise ApiError(404, "not_found_error", "File Not Found")
        entry = route.get(self.command) or (route.get("GET") if self.command == "HEAD" else None)
        if entry is None:
            allow = ", ".join(sorted(route))
            raise ApiError(405, "invalid_request_error", f"method {self.command} is not allowed on {path}",
                           headers={"Allow": allow})
        name, kind = entry
        getattr(self, name)(kind)

    def check_auth(self) -> None:
        keys = self.server.api_keys
        if not keys:
            return
        # `Authorization: Bearer KEY` or `X-Api-Key: KEY`; each compared in constant time
        given = []
        auth = self.headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() == "bearer":
                given.append(token.strip())
        x_key = self.headers.get("X-Api-Key")
        if x_key is not None:
            given.append(x_key.strip())
        ok = False
        for g in given:
            for key in keys:
                ok |= hmac.compare_digest(g.encode("utf-8", "replace"), key)
        if not ok:
            raise ApiError(401, "authentication_error", "Invalid API Key")

    # -- endpoints ----------------------------------------------------------------------------

    def h_health(self, _kind) -> None:
        svc = self.server.service
        if not svc.ready:
            raise ApiError(503, "unavailable_error",
                           "the server is shutting down" if svc.closing else "Loading model")
        self.send_json(200, {"status": "ok"})

    def h_props(self, _kind) -> None:
        self.send_json(200, self.server.service.props())

    def h_set_props(self, _kind) -> None:
        """POST /props: llama-server changes nothing there either; 501 without --props."""
        svc = self.server.service
        if not getattr(svc.settings, "props_endpoint", False):
            raise ApiError(501, "not_supported_error",
                           "This server does not support changing global properties. Start it with `--props`")
        if not isinstance(self.read_json(), dict):
            raise api.bad_request("request body must be a JSON object")
        self.send_json(200, {"success": True})

    def h_apply_template(self, _kind) -> None:
        self.send_json(200, self.server.service.apply_template(self.read_json()))

    def h_input_tokens(self, _kind) -> None:
        self.send_json(200, self.server.service.count_input_tokens(self.read_json()))

    def h_infill(self, _kind) -> None:
        """POST /infill needs the model's fill-in-the-middle tokens, which this server does not
        read: 501 as llama-server answers for a model without them (before reading the body)."""
        raise ApiError(501, "not_supported_error",
                       "Infill is not supported by this model: this server does not implement "
                       "fill-in-the-middle (FIM)")

    def h_slots(self, _kind) -> None:
        svc = self.server.service
        if not svc.settings.slots_endpoint:
            raise ApiError(501, "not_supported_error",
                           "This server does not support slots endpoint. Start it without `--no-slots`")
        slots = svc.slots()
        q = urlsplit(self.path).query
        if "fail_on_no_slot=1" in q.split("&") and all(s["is_processing"] for s in slots):
            raise ApiError(503, "unavailable_error", "no slot available")
        self.send_json(200, slots)

    def h_metrics(self, _kind) -> None:
        svc = self.server.service
        if not svc.settings.metrics_endpoint:
            raise ApiError(501, "not_supported_error",
                           "This server does not support metrics endpoint. Start it with `--metrics`")
        self.send_bytes(200, svc.metrics_text().encode(), "text/plain; version=0.0.4",
                        {"Process-Start-Time-Unix": str(PROCESS_START)})

    def h_models(self, _kind) -> None:
        self.send_json(200, self.server.service.models())

    def h_tokenize(self, _kind) -> None:
        self.send_json(200, self.server.service.tokenize(self.read_json()))

    def h_detokenize(self, _kind) -> None:
        self.send_json(200, self.server.service.detokenize(self.read_json()))

    def watch_client(self, handle):
        """While the request runs: cancel its handle the moment the client closes the connection."""
        gone = []

        def on_close():
            gone.append(True)
            handle.cancel()

        @contextlib.contextmanager
        def cm():
            with self.server.watcher.watch(self.connection, on_close):
                yield gone
        return cm()

    def h_generate(self, kind: str) -> None:
        svc = self.server.service
        job = svc.parse(self.read_json(), kind)
        if job.stream:
            self.send_stream(svc.stream(job, watch=self.watch_client))
        else:
            self.send_json(200, svc.complete(job, watch=self.watch_client))

    def preflight(self) -> None:
        """CORS preflight (only with --cors-origin), any path: 200 with an empty body, as
        llama-server; Access-Control-Allow-Origin only for an allowed origin (a browser then
        refuses the real request). No API key is sent with it.

        "*" in Access-Control-Allow-Headers does not cover Authorization (Fetch standard),
        so with --api-key the key's headers are listed too."""
        srv = self.server
        allow_headers = srv.cors_headers
        if srv.api_key is not None and allow_headers.strip() == "*":
            allow_headers = "*, Authorization, X-Api-Key"
        self._settle_body()
        self.send_response(200)
        for k, v in self.cors_headers().items():
            self.send_header(k, v)
        self.send_header("Access-Control-Allow-Credentials", "true" if srv.cors_credentials else "false")
        self.send_header("Access-Control-Allow-Methods", srv.cors_methods)
        self.send_header("Access-Control-Allow-Headers", allow_headers)
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    # -- static files -------------------------------------------------------------------------

    def serve_static(self, path: str) -> None:
        root = self.server.static_root or STATIC_DIR
        f = safe_join(root, path)
        if f is None:
            raise ApiError(404, "not_found_error", "File Not Found")
        data = f.read_bytes()
        ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        self.send_bytes(200, data, ctype, {"X-Content-Type-Options": "nosniff"})


def safe_join(root: Path, url_path: str) -> Path | None:
    """The file under root that url_path names, or None when it does not exist or would leave
    root (.., encoded %2e%2e, backslashes, NUL, symlinks pointing out)."""
    try:
        rel = unquote(url_path, errors="strict")
    except UnicodeError:
        return None
    if "\x00" in rel or "\\" in rel:
        return None
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    if not parts:
        parts = ["index.html"]
    try:
        root = root.resolve()
        cand = root.joinpath(*parts)
        if cand.is_dir():
            cand = cand / "index.html"
        real = cand.resolve(strict=True)
    except (OSError, RuntimeError, UnicodeError):
        return None
    if not real.is_relative_to(root) or not real.is_file():
        return None
    return real


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


def make_server(service: Service, host: str, port: int, *, api_key: str | Sequence[str] | None = None,
                static_root: str | None = None, timeout: float = 600.0, threads_http: int = 64,
                cors_origins: list[str] | None = None, cors_methods: str = CORS_METHODS,
                cors_headers: str = CORS_HEADERS, cors_credentials: bool = True) -> Server:
    return Server((host, port), service, api_key=api_key, static_root=static_root, timeout=timeout,
                  threads_http=threads_http, cors_origins=cors_origins, cors_methods=cors_methods,
                  cors_headers=cors_headers, cors_credentials=cors_credentials)
