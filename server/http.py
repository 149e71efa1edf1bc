"""HTTP: routing, auth, JSON bodies, SSE streams and static files over ThreadingHTTPServer.

One handler thread per connection (daemon threads). A handler reads and checks the request,
calls the Service, and writes JSON or a stream of server-sent events; it never touches the
model beyond the tokenizer. A client that goes away while a stream is written is noticed at
the next event: the generator is closed, which cancels the engine request.
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import api
from .api import ApiError
from .service import DONE, Service

log = logging.getLogger("server.http")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY = 8 * 1024 * 1024        # bytes of a request body before 413
PUBLIC_PATHS = {"/health", "/v1/health"}
BUILTIN_PAGE_PATHS = {"/", "/index.html"}  # the chat page: no data, open without the key

# path -> {method: (handler method name, kind)}
ROUTES: dict[str, dict[str, tuple[str, str | None]]] = {
    "/health": {"GET": ("h_health", None)},
    "/v1/health": {"GET": ("h_health", None)},
    "/props": {"GET": ("h_props", None)},
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
}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, service: Service, api_key: str | None = None,
                 static_root: str | None = None, timeout: float = 600.0):
        self.service = service
        self.api_key = api_key.encode() if api_key else None
        self.static_root = Path(static_root).resolve() if static_root else None
        self.io_timeout = timeout
        self.active = 0
        self.active_cond = threading.Condition()
        super().__init__(addr, Handler)

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
        self.timeout = self.server.io_timeout  # socket timeout for reads and writes
        super().setup()

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

    def send_bytes(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        self._settle_body()
        self.send_response(status)
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
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "invalid_request_error",
                           "chunked request bodies are not supported: send Content-Length")
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
        try:
            text = data.decode("utf-8")
            return json.loads(text, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise api.bad_request("the request body is not valid UTF-8") from None
        except ValueError as e:
            raise api.bad_request(f"the request body is not valid JSON: {e}") from None

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
        is_page = route is None and self.command in ("GET", "HEAD")
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
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization") or self.headers.get("X-Api-Key") or ""
        if given.startswith("Bearer "):
            given = given[len("Bearer "):]
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), key):
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
        self.send_bytes(200, svc.metrics_text().encode(), "text/plain; version=0.0.4")

    def h_models(self, _kind) -> None:
        self.send_json(200, self.server.service.models())

    def h_tokenize(self, _kind) -> None:
        self.send_json(200, self.server.service.tokenize(self.read_json()))

    def h_detokenize(self, _kind) -> None:
        self.send_json(200, self.server.service.detokenize(self.read_json()))

    def h_generate(self, kind: str) -> None:
        svc = self.server.service
        job = svc.parse(self.read_json(), kind)
        if job.stream:
            self.send_stream(svc.stream(job))
        else:
            self.send_json(200, svc.complete(job))

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


def make_server(service: Service, host: str, port: int, *, api_key: str | None = None,
                static_root: str | None = None, timeout: float = 600.0) -> Server:
    return Server((host, port), service, api_key=api_key, static_root=static_root, timeout=timeout)
