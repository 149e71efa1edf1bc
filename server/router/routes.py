"""The router's endpoints: its own (/health, /props, /models, /models/load, /models/unload,
/models/sse) and every other one passed on to the model the request names, in the body's
`model` (POST) or the `model` query parameter (GET), as llama-server's router does.

`RouterHandler` is the single-model server's Handler (same door, same API key check, same error
shapes) with another `route`. `RouterService` is what the listeners hold in place of a Service.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import time
from urllib.parse import parse_qs, urlsplit

from llama_lib import llama_build_info

from ..api.stream import PING
from ..errors import ApiError, bad_request
from ..http.routes import PUBLIC_PATHS, Handler
from ..http.transport import Server, Server6
from . import hf_cache
from .models import ModelTable
from .presets import PresetError
from .proxy import ChildConnections, forward

log = logging.getLogger("server.router")
SSE_PING_S = 15.0
# llama-server's test knob (its test_router.py sets it): a request holds its model 2 s before it
# is passed on, so that tests can see a busy model; never set in production
FAKE_TIMING_S = 2.0 if os.environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING") else 0.0


class RouterService:
    """The router's state as the HTTP side reads it (a Service's flags, the model table)."""

    def __init__(self, table: ModelTable, timeout: float):
        self.table = table
        self.timeout = timeout
        self.conns = ChildConnections(timeout)
        self.closing = self.refusing = self.draining = False
        self.ready = True
        self.reload_specs = None  # set by run.py: the sources read again (GET /models?reload=1)


class RouterHandler(Handler):
    def route(self, path: str) -> None:
        svc: RouterService = self.server.service
        if self.command == "OPTIONS":
            if self.server.cors_origins:
                return self.preflight()
            raise ApiError(405, "invalid_request_error", f"method OPTIONS is not allowed on {path}")
        if path not in PUBLIC_PATHS:
            self.check_auth()
        query = parse_qs(urlsplit(self.path).query)
        own = {("GET", "/health"): self.r_health, ("GET", "/v1/health"): self.r_health,
               ("GET", "/models"): self.r_models, ("GET", "/v1/models"): self.r_models,
               ("POST", "/models/load"): self.r_load, ("POST", "/models/unload"): self.r_unload,
               ("GET", "/models/sse"): self.r_sse, ("DELETE", "/models"): self.r_delete,
               ("POST", "/models"): self.r_download}
        method = "GET" if self.command == "HEAD" else self.command
        if (method, path) in own:
            return own[(method, path)](svc, query)
        if method == "GET" and path == "/props" and not query.get("model"):
            return self.send_json(200, self.router_props(svc))
        if method == "POST":
            body = self.read_raw()
            try:
                parsed = json.loads(body) if body.strip() else {}
            except ValueError as e:
                raise bad_request(f"the request body is not valid JSON: {e}") from None
            name = parsed.get("model") if isinstance(parsed, dict) else None
        else:
            body, name = None, query.get("model", [""])[0]
        if name is not None and not isinstance(name, str):
            raise bad_request("'model' must be a string")
        inst = svc.table.get(name or "")
        autoload = query.get("autoload", [""])[0]
        autoload = svc.table.autoload if not autoload else autoload in ("true", "1")
        gone = []

        def on_close():
            gone.append(True)
            svc.table.poke()

        with svc.table.hold(inst):
            with self.server.watcher.watch(self.connection, on_close):  # while it waits
                port, key = svc.table.ready(inst, autoload, svc.timeout, lambda: bool(gone))
            if FAKE_TIMING_S:
                time.sleep(FAKE_TIMING_S)
            forward(self, svc.conns, port, key, body)

    def read_raw(self) -> bytes:
        self._body_done = True
        try:
            return self._read_body()
        except (socket.timeout, TimeoutError):
            self.close_connection = True
            raise ApiError(408, "invalid_request_error", "the request body did not arrive in time") from None

    def r_health(self, svc, _q) -> None:
        self.send_json(200, {"status": "ok"})

    def router_props(self, svc: RouterService) -> dict:
        return {"role": "router", "max_instances": svc.table.models_max,
                "models_autoload": svc.table.autoload, "model_alias": "llama-server",
                "model_path": "none", "default_generation_settings": {"params": {}, "n_ctx": 0},
                "ui_settings": {}, "build_info": llama_build_info(),
                "cors_proxy_enabled": False, "is_sleeping": False}

    def r_models(self, svc: RouterService, q) -> None:
        if q.get("reload", [""])[0] and svc.reload_specs is not None:
            try:
                svc.table.reload(svc.reload_specs())
            except PresetError as e:
                raise ApiError(400, "invalid_request_error", f"reload: {e}") from None
        t = int(time.time())
        data = [{"id": name, "aliases": list(i.spec.aliases), "tags": [], "object": "model",
                 "owned_by": "llamacpp", "created": t, "status": svc.table.status(i),
                 "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                 "source": i.spec.source, "can_remove": i.spec.source == "cache", "path": i.spec.path,
                 "memory_mib": round(i.spec.memory_mib)}  # ours: the estimate (--models-memory)
                for name, i in svc.table.models.items()]
        self.send_json(200, {"data": data, "object": "list"})

    def _body_model(self, svc: RouterService, not_found: int):
        body = self.read_json()
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise bad_request("'model' must be a string")
        return svc.table.get(name, not_found)

    def r_load(self, svc: RouterService, _q) -> None:
        inst = self._body_model(svc, 404)
        if inst.running:
            raise bad_request("model is already running")
        svc.table.load(inst)
        self.send_json(200, {"success": True})

    def r_unload(self, svc: RouterService, _q) -> None:
        inst = self._body_model(svc, 400)
        if not inst.running:
            raise bad_request("model is not running")
        svc.table.unload(inst)
        self.send_json(200, {"success": True})

    def r_delete(self, svc: RouterService, q) -> None:
        """DELETE /models?model=NAME: a model of the Hugging Face cache, its files removed."""
        name = q.get("model", [""])[0]
        if not name:
            raise bad_request("model must be a non-empty string")
        inst = svc.table.get(name, 404)
        if inst.spec.source != "cache":
            raise bad_request(f"model '{name}' is not removable (not from the Hugging Face cache)")
        svc.table.remove(inst)
        self.send_json(200, {"success": True})

    def r_download(self, svc: RouterService, _q) -> None:
        """POST /models {"model": "owner/name:TAG"}: llama-server downloads it into the cache;
        nothing is downloaded here."""
        body = self.read_json()
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request("model must be a non-empty string")
        if svc.table.find(name) is not None:
            raise bad_request(f"model '{name}' already exists")
        raise ApiError(501, "not_supported_error",
                       "downloading models is not supported by this server: put the GGUF in the "
                       f"Hugging Face cache ({hf_cache.cache_dir()}) or --models-dir, then GET /models?reload=1")

    def r_sse(self, svc: RouterService, _q) -> None:
        def events():
            with svc.table.events() as q:
                while True:
                    try:
                        ev = q.get(timeout=SSE_PING_S)
                    except queue.Empty:
                        yield PING
                        continue
                    if ev.get("event") == "shutdown":
                        return
                    yield ev
        self.close_connection = True
        self.send_stream(events())


def make_router_server(service: RouterService, host: str, port: int, *, v6only: bool = False, **kw) -> Server:
    if ":" in host:
        return Server6((host, port), RouterHandler, service, v6only=v6only, **kw)
    return Server((host, port), RouterHandler, service, **kw)
