"""OpenAI's Responses API: `POST /v1/responses` (and `/responses`, as llama-server).

The body is read as a chat (server.api.shapes.responses_input turns it into one, with the
stored conversation of `previous_response_id` in front); the answer is a `response` object
whose `output` holds `reasoning`, `message` and `function_call` items (responses_items).
Streamed: `response.created`, `response.in_progress`, the items' events, then
`response.completed` (or `response.incomplete` when cut by max_output_tokens,
`response.failed` on an error), each with its `sequence_number` and named by an `event:` line
as OpenAI and llama-server send them; no `[DONE]`.
With `store` (default true) the response and its conversation go into the server's
ResponseStore once finished.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterator

from llama_lib import FinishReason

from ...chat.output import ChatOutput
from ..job import KIND_OAI_RESPONSES, Job
from .base import Event, Shape
from .common import timings
from .responses_input import ResponsesRequest, to_chat_body
from .responses_items import Items

log = logging.getLogger("server.responses")

# what a response object says for a request field the body left out
ECHO_DEFAULTS = {"instructions": None, "max_output_tokens": None, "metadata": {}, "parallel_tool_calls": True,
                 "previous_response_id": None, "tool_choice": "auto", "tools": [],
                 "text": {"format": {"type": "text"}}, "reasoning": {"effort": None, "summary": None}}


def responses_usage(h) -> dict:
    n_in = h.n_cached_tokens + h.n_prompt_tokens
    return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": h.n_cached_tokens},
            "output_tokens": h.n_generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + h.n_generated}


def _named(events: Callable[..., Iterator[object]]) -> Callable[..., Iterator[object]]:
    """Each event dict sent as a named SSE event (`event: response.created`...)."""
    @functools.wraps(events)
    def named(*args, **kw) -> Iterator[object]:
        for ev in events(*args, **kw):
            yield Event(ev["type"], ev) if isinstance(ev, dict) and "type" in ev else ev
    return named


class ResponsesShape(Shape):
    kind = KIND_OAI_RESPONSES
    id_prefix = "resp_"
    n_predict_names = ("max_tokens", "n_predict")  # max_output_tokens arrives as max_tokens
    reads_messages = True
    ends_with_done = False

    @classmethod
    def chat_body(cls, body, info) -> tuple[dict, ResponsesRequest]:
        """The body as a chat body, and what this shape needs beyond the chat job."""
        return to_chat_body(body, getattr(info, "responses", None))

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.req: ResponsesRequest = self.job.wire or ResponsesRequest([])
        self.reader = ChatOutput(self.job.chat) if self.job.chat is not None else None
        self.items = Items()
        self.said = ""
        self.progressed = False

    # -- the response object ------------------------------------------------------------------

    def response(self, status: str, h=None) -> dict:
        job, sp = self.job, self.job.params.sampling
        echo = {k: (ECHO_DEFAULTS.get(k) if v is None else v) for k, v in self.req.echo.items()}
        out = {"id": job.id, "object": "response", "created_at": job.created, "status": status,
               "background": False, "error": None, "incomplete_details": None,
               **ECHO_DEFAULTS, **echo, "model": self.ctx.model_name, "output": self.items.output,
               "temperature": sp.temperature, "top_p": sp.top_p, "truncation": "disabled",
               "usage": None, "store": self.req.store is not None}
        if h is not None:
            out["usage"] = responses_usage(h)
            out["completed_at"] = int(time.time())
            if status == "incomplete":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def _status(self, h) -> str:
        return "incomplete" if h.finish_reason == FinishReason.LENGTH else "completed"

    def _deltas(self, final: bool) -> list[dict]:
        if self.reader is not None:
            return self.reader.deltas(self.said, final)
        return []

    def _message(self) -> dict:
        """The answer as the assistant message a follow-up renders (same call ids as the items)."""
        if self.reader is None:
            return {"role": "assistant", "content": self.said}
        msg = self.reader.message(self.said)
        if msg.get("content") is None and "tool_calls" not in msg:
            msg["content"] = ""
        return msg

    def _keep(self, response: dict) -> None:
        store = self.req.store
        if store is not None and response["status"] != "failed":
            if not store.put(self.job.id, response, self.req.messages + [self._message()]) and store.max_bytes:
                log.info("response %s is larger than --responses-store; not stored", self.job.id)

    # -- a stream -----------------------------------------------------------------------------

    @_named
    def opening(self) -> Iterator[object]:
        first = self.response("in_progress")
        yield self.items.event("response.created", response=first)
        yield self.items.event("response.in_progress", response=dict(first))

    @_named
    def on_chunk(self, h, chunk, text: str, n_predicted: int) -> Iterator[object]:
        evs: list[dict] = []
        if self.req.return_progress and not self.progressed:
            # the prompt is decoded once the first token comes: its progress, reported once
            self.progressed = True
            total = h.n_cached_tokens + h.n_prompt_tokens
            evs.append(self.items.event(
                "response.in_progress", response=self.response("in_progress"),
                prompt_progress={"total": total, "cache": h.n_cached_tokens, "processed": total,
                                 "time_ms": h.timings.prompt_s * 1000.0}))
        self.said += text
        if self.reader is None:
            if text:
                evs += self.items.add({"content": text})
        else:
            for delta in self._deltas(False):
                evs += self.items.add(delta)
        if evs and self.req.timings_per_token:
            evs[-1]["timings"] = timings(h)
        yield from evs

    @_named
    def ending(self, h, done: bool) -> Iterator[object]:
        if self.failed(h):
            yield from self.items.close("incomplete")
            err = self.error(h)["error"]
            resp = self.response("failed", h)
            resp["error"] = {"code": "server_error", "message": err.get("message", "")}
            yield self.items.event("response.failed", response=resp)
            return
        status = self._status(h)
        for delta in self._deltas(True):
            yield from self.items.add(delta)
        yield from self.items.close(status)
        resp = self.response(status, h)
        self._keep(resp)
        last = self.items.event("response.incomplete" if status == "incomplete" else "response.completed",
                                response=resp)
        last["timings"] = timings(h)
        yield last

    # -- whole answers ------------------------------------------------------------------------

    def answer(self, h, text: str) -> dict:
        self.said = text
        if self.reader is None:
            self.items.add({"content": text})
        else:
            for delta in self._deltas(True):
                self.items.add(delta)
        status = self._status(h)
        self.items.close(status)
        resp = self.response(status, h)
        self._keep(resp)
        return {**resp, "timings": timings(h)}  # llama-server's timings, not kept in the store

    @classmethod
    def merge(cls, job: Job, answers: list[dict], handles: list) -> dict:
        return answers[0]  # a response has one answer (n is not read)
