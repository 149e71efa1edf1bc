#!/usr/bin/env python3
"""The engine inside an asyncio web application: Starlette on uvicorn, streaming SSE in-process.

    pip install starlette uvicorn
    python examples/asgi_app.py --port 8000 -np 4
    curl -N localhost:8000/generate -d '{"prompt": "User:\\nHi!\\nAssistant:\\n", "stream": true}'

One Engine runs for the whole application (started in the lifespan, closed at shutdown). Each
HTTP request is a coroutine that submits to the engine and reads its output with `async for`
(or `await request.aresult()`): no thread per request, the engine's thread hands every chunk to
the event loop. When a client goes away, Starlette cancels the streaming task; the cancellation
reaches the engine request, whose slot is free at the next step.

POST /generate {"prompt": str, "n_predict": int, "temperature": float, "ignore_eos": bool,
                "stream": bool}
  stream: text/event-stream of `data: {"text": ...}` events, then
          `data: {"done": true, "finish_reason": ..., "n_generated": ...}`
  else:   {"text", "finish_reason", "n_generated"}
GET /health -> {"busy_slots", "waiting", "cancelled"}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request as HttpRequest  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from llama_lib import Engine, EngineConfig, Model, PromptTooLong, QueueFull, RequestParams, SamplingParams  # noqa: E402


def make_app(model_path: str | None, config: EngineConfig) -> Starlette:
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        model = Model(model_path)
        engine = Engine(model, config).start()
        state["engine"] = engine
        try:
            yield
        finally:
            engine.close()
            model.close()

    async def generate(http: HttpRequest):
        try:
            body = await http.json()
            prompt = body["prompt"]
            params = RequestParams(n_predict=int(body.get("n_predict", 64)),
                                   ignore_eos=bool(body.get("ignore_eos", False)),
                                   sampling=SamplingParams(temperature=float(body.get("temperature", 0.8))))
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string")
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        try:
            req = state["engine"].submit(prompt, params)
        except QueueFull as e:
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})
        except (PromptTooLong, ValueError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if not body.get("stream"):
            text = await req.aresult()  # cancelled with this task if the client goes away
            return JSONResponse({"text": text, "finish_reason": req.finish_reason.value,
                                 "n_generated": req.n_generated})

        async def events():
            async for chunk in req:  # a disconnect cancels this task, and so the request
                yield f"data: {json.dumps({'text': chunk.text})}\n\n"
            end = {"done": True, "finish_reason": req.finish_reason.value, "n_generated": req.n_generated}
            yield f"data: {json.dumps(end)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(http: HttpRequest):
        e = state["engine"]
        return JSONResponse({"busy_slots": e.n_busy, "waiting": e.n_waiting,
                             "cancelled": e.stats.n_requests_cancelled})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]),
                             Route("/health", health)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF path (default: the fetched default model)")
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args(argv)
    import uvicorn
    config = EngineConfig(n_parallel=a.parallel, n_ctx=a.ctx_size, n_threads=a.threads, n_threads_batch=a.threads)
    uvicorn.run(make_app(a.model, config), host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
