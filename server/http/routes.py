"""Routes and endpoints: which path and method call which Service method, behind the API key.

The HTTP layer only translates: a handler reads the body, calls the Service (or server.info),
and writes its JSON or its stream of events; it never touches the model beyond the tokenizer.
`ApiError` becomes llama-server's JSON error; a bug becomes a 500 and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import mimetypes
import socket
import time
from urllib.parse import parse_qs, unquote, urlsplit

from .. import info
from ..api.embeddings import refuse_not_enabled
from ..api.requests import get_user
from ..api.job import KIND_ANTHROPIC, KIND_COMPLETION, KIND_OAI_CHAT, KIND_OAI_COMPLETION, KIND_OAI_RESPONSES
from ..api.shapes import SHAPES
from ..api.shapes.responses_input import to_chat_body
from ..errors import RETRY_AFTER, ApiError, ClientGone, bad_request, error_body
from ..config.cli_schedule import key_user
from ..service import Service
from . import slot_files
from .connection import Connection
from .static_files import STATIC_DIR, safe_join
from .transport import Server, Server6

log = logging.getLogger("server.http")

PUBLIC_PATHS = {"/health", "/v1/health"}
# what a sleeping server answers without loading its model again (--sleep-idle-seconds)
NO_WAKE = {("GET", p) for p in ("/health", "/v1/health", "/props", "/models", "/v1/models", "/metrics")}
BUILTIN_PAGE_PATHS = {"/", "/index.html"}  # the chat page: no data, open without the key
# llama-server's web UI serves these without the key; we do not have them, so with
# --api-key they answer 404 (not 401) like any missing page
UPSTREAM_UI_ASSETS = {"/sw.js", "/manifest.webmanifest", "/_app/version.json", "/favicon.ico"}
PROCESS_START = int(time.time())  # /metrics' Process-Start-Time-Unix header
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
    "/completion": {"POST": ("h_generate", KIND_COMPLETION)},
    "/completions": {"POST": ("h_generate", KIND_COMPLETION)},
    "/v1/completions": {"POST": ("h_generate", KIND_OAI_COMPLETION)},
    "/chat/completions": {"POST": ("h_generate", KIND_OAI_CHAT)},
    "/v1/chat/completions": {"POST": ("h_generate", KIND_OAI_CHAT)},
    "/apply-template": {"POST": ("h_apply_template", None)},
    "/chat/completions/input_tokens": {"POST": ("h_input_tokens", None)},
    "/v1/chat/completions/input_tokens": {"POST": ("h_input_tokens", None)},
    "/v1/chat/completions/control": {"POST": ("h_control", None)},
    "/infill": {"POST": ("h_infill", None)},
    "/embedding": {"POST": ("h_embed", "llama")},
    "/embeddings": {"POST": ("h_embed", "llama")},
    "/v1/embeddings": {"POST": ("h_embed", "oai")},
    "/v1/messages": {"POST": ("h_generate", KIND_ANTHROPIC)},
    "/v1/messages/count_tokens": {"POST": ("h_count_tokens", KIND_ANTHROPIC)},
    "/responses": {"POST": ("h_generate", KIND_OAI_RESPONSES)},
    "/v1/responses": {"POST": ("h_generate", KIND_OAI_RESPONSES)},
    "/responses/input_tokens": {"POST": ("h_responses_input_tokens", None)},
    "/v1/responses/input_tokens": {"POST": ("h_responses_input_tokens", None)},
}
SLOT_ACTION_ROUTE = {"POST": ("h_slot_action", None)}  # /slots/{id}?action=save|restore|erase
STORED_RESPONSE_ROUTE = {"GET": ("h_stored_response", None), "DELETE": ("h_stored_response", None)}


class Handler(Connection):
    """One connection's requests: routing, the API key, CORS preflight, endpoints, static files."""

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
        if self.server.service.refusing:  # a draining server's 503s are not requests in flight
            self.server.end()
            return self._dispatch()
        try:
            self._dispatch()
        finally:
            self.server.end()

    def _dispatch(self) -> None:
        self._body_done = False
        self.auth_key = None  # the API key the request authenticated with (check_auth)
        path = urlsplit(self.path).path
        if self.server.service.closing:
            self.close_connection = True
        try:
            self.route(path)
        except ApiError as e:
            self.send_api_error(e, self.error_shape(path))
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except ClientGone:
            self.close_connection = True
            log.info("client %s went away; its request was cancelled", self.client_address[0])
        except Exception as e:  # a bug: answer 500 and keep serving
            log.exception("error while handling %s %s", self.command, path)
            self.close_connection = True
            try:
                self.send_json(500, error_body(500, "server_error", f"internal error: {type(e).__name__}"))
            except OSError:
                pass

    def route(self, path: str) -> None:
        svc = self.server.service
        route = ROUTES.get(path) or (SLOT_ACTION_ROUTE if path.startswith("/slots/") else None) or (
            STORED_RESPONSE_ROUTE if path.startswith(("/v1/responses/", "/responses/")) else None)
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
        if is_page and not svc.settings.webui:
            raise ApiError(404, "not_found_error", "File Not Found")
        if is_page and not self.server.static_root and path in UPSTREAM_UI_ASSETS:
            raise ApiError(404, "not_found_error", "File Not Found")
        if path not in PUBLIC_PATHS and not (is_page and path in BUILTIN_PAGE_PATHS and not self.server.static_root):
            self.check_auth()
        if svc.refusing and path not in PUBLIC_PATHS:  # the drain's second step (server.http.drain)
            self.close_connection = True
            raise ApiError(503, "unavailable_error", "the server is draining; retry on another replica",
                           headers={"Retry-After": RETRY_AFTER})
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
        if (self.command if self.command != "HEAD" else "GET", path) in NO_WAKE:
            return getattr(self, name)(kind)
        with svc.sleep.awake():  # the whole request, stream included, keeps the model loaded
            getattr(self, name)(kind)

    @staticmethod
    def error_shape(path: str):
        """The error body of a path's wire format (Anthropic's on /v1/messages, auth failures
        included), or None: llama-server's."""
        kind = ROUTES.get(path, {}).get("POST", (None, None))[1]
        shape = SHAPES.get(kind) if isinstance(kind, str) else None
        return shape.error_body if shape is not None else None

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
                match = hmac.compare_digest(g.encode("utf-8", "replace"), key)
                ok |= match
                if match:
                    self.auth_key = key
        if not ok:
            raise ApiError(401, "authentication_error", "Invalid API Key")

    # -- endpoints ----------------------------------------------------------------------------

    def h_health(self, _kind) -> None:
        svc = self.server.service
        if svc.draining:  # SIGTERM: out of the balancer's rotation first (server.http.drain)
            return self.send_json(503, {"status": "draining"}, {"Retry-After": RETRY_AFTER})
        if not svc.ready:
            raise ApiError(503, "unavailable_error",
                           "the server is shutting down" if svc.closing else "Loading model")
        self.send_json(200, {"status": "ok"})

    def h_props(self, _kind) -> None:
        svc = self.server.service
        self.send_json(200, svc.asleep_view["props"] if svc.sleeping else info.props(svc))

    def h_set_props(self, _kind) -> None:
        """POST /props: llama-server changes nothing there either; 501 without --props."""
        svc = self.server.service
        if not svc.settings.props_endpoint:
            raise ApiError(501, "not_supported_error",
                           "This server does not support changing global properties. Start it with `--props`")
        if not isinstance(self.read_json(), dict):
            raise bad_request("request body must be a JSON object")
        self.send_json(200, {"success": True})

    def h_apply_template(self, _kind) -> None:
        self.send_json(200, self.server.service.apply_template(self.read_json()))

    def h_control(self, _kind) -> None:
        """reasoning_end on a running chat completion, by its id (server/chat/control.py)."""
        self.send_json(200, self.server.service.control(self.read_json()))

    def h_input_tokens(self, _kind) -> None:
        self.send_json(200, self.server.service.count_input_tokens(self.read_json()))

    def h_count_tokens(self, kind: str) -> None:
        """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would decode
        them (no max_tokens needed), as `{"input_tokens": N}`."""
        svc = self.server.service
        body = SHAPES[kind].chat_body(self.read_json(), None)[0]
        self.send_json(200, {"input_tokens": svc.count_input_tokens(body)["input_tokens"]})

    def h_responses_input_tokens(self, _kind) -> None:
        """POST /v1/responses/input_tokens: the prompt's tokens of a Responses body."""
        svc = self.server.service
        self.send_json(200, svc.count_input_tokens(to_chat_body(self.read_json(), svc.responses)[0]))

    def h_stored_response(self, _kind) -> None:
        """GET / DELETE /v1/responses/{id}: a stored response (404 when unknown or evicted)."""
        store = self.server.service.responses
        rid = unquote(urlsplit(self.path).path.rsplit("/", 1)[-1])
        if self.command == "DELETE":
            if not store.delete(rid):
                raise ApiError(404, "not_found_error", f"Response with id '{rid}' not found.")
            return self.send_json(200, {"id": rid, "object": "response", "deleted": True})
        entry = store.get(rid)
        if entry is None:
            raise ApiError(404, "not_found_error", f"Response with id '{rid}' not found.")
        self.send_json(200, entry.response)

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
        slots = info.slots(svc)
        q = urlsplit(self.path).query
        if "fail_on_no_slot=1" in q.split("&") and all(s["is_processing"] for s in slots):
            raise ApiError(503, "unavailable_error", "no slot available")
        self.send_json(200, slots)

    def h_slot_action(self, _kind) -> None:
        svc = self.server.service
        save_dir = svc.settings.slot_save_path
        if not save_dir:  # before reading the body, as llama-server
            raise ApiError(501, "not_supported_error",
                           "This server does not support slots action. Start it with `--slot-save-path`")
        url = urlsplit(self.path)
        id_slot = slot_files.parse_slot_id(unquote(url.path[len("/slots/"):]))
        action = parse_qs(url.query).get("action", [""])[0]
        body = self.read_json() if action in ("save", "restore") else None
        self.send_json(200, slot_files.slot_action(svc.engine, save_dir, id_slot, action, body))

    def h_metrics(self, _kind) -> None:
        svc = self.server.service
        if not svc.settings.metrics_endpoint:
            raise ApiError(501, "not_supported_error",
                           "This server does not support metrics endpoint. Start it with `--metrics`")
        text = info.scrape_metrics(svc)
        self.send_bytes(200, text.encode(), "text/plain; version=0.0.4",
                        {"Process-Start-Time-Unix": str(PROCESS_START)})

    def h_models(self, _kind) -> None:
        svc = self.server.service
        self.send_json(200, svc.asleep_view["models"] if svc.sleeping else info.models(svc))

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
        job = svc.parse(self.read_json(), kind, user=self.request_user())
        if job.stream:
            self.send_stream(svc.stream(job, watch=self.watch_client))
        else:
            self.send_json(200, svc.complete(job, watch=self.watch_client))

    def request_user(self) -> str | None:
        """Who asks when the body names nobody: the --user-header header, else the API key it
        authenticated with (hashed), else None (docs/scheduling.md). A bad header is a 400."""
        name = self.server.service.settings.user_header
        v = self.headers.get(name)
        if v is not None:
            return get_user(v.strip(), f"the {name} header")
        return key_user(self.auth_key) if self.auth_key else None

    def h_embed(self, kind: str) -> None:
        svc = self.server.service
        if svc.engine.embedder is None:  # before reading the body, as llama-server
            raise refuse_not_enabled()
        self.send_json(200, svc.embed(self.read_json(), kind == "oai", watch=self.watch_client))

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


def make_server(service: Service, host: str, port: int, *, v6only: bool = False, **kw) -> Server:
    """A server on (host, port) with Server's keyword options (API keys, static root, time
    limits, threads, caps, CORS); an IPv6 literal host gets an AF_INET6 socket (IPv6 only with
    `v6only`)."""
    if ":" in host:
        return Server6((host, port), Handler, service, v6only=v6only, **kw)
    return Server((host, port), Handler, service, **kw)
