"""Anthropic's Messages API: `POST /v1/messages` (the body is read by anthropic_request.py).

Whole: `{"type": "message", "role": "assistant", "content": [blocks], "stop_reason",
"stop_sequence", "usage"}`; blocks are `thinking` (the reasoning split, empty signature),
`text`, and `tool_use` (id, name, input as an object) from the template's calls parser.
Streamed: named events, each block opened and closed in turn with its index:
`message_start` (with the usage known once the prompt is admitted), `ping`,
`content_block_start` / `content_block_delta` (`thinking_delta` then `signature_delta`,
`text_delta`, `input_json_delta`) / `content_block_stop`, `message_delta` (stop reason, usage),
`message_stop`; a failure is an `error` event. Usage: `cache_read_input_tokens` is the prompt
prefix the prompt cache held (not decoded), `input_tokens` the rest, which was decoded.
Errors: `{"type": "error", "error": {"type": ..., "message": ...}}`.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from llama_lib import FinishReason

from ...chat.output import ChatOutput
from ...errors import ApiError
from ..job import KIND_ANTHROPIC, Job
from .anthropic_request import to_chat_body
from .base import Event, Shape
from .common import handle_error

# Anthropic's error type of each status (https://docs.anthropic.com/en/api/errors)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_json(e: ApiError) -> dict:
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def usage(h) -> dict:
    return {"input_tokens": h.n_prompt_tokens, "cache_read_input_tokens": h.n_cached_tokens,
            "output_tokens": h.n_generated}


def stop_reason(h, job: Job, has_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): a token limit wins, then calls, then a stop string the
    request gave (a template's turn marker is the turn's end)."""
    if h.finish_reason == FinishReason.LENGTH:
        return "max_tokens", None
    if has_calls:
        return "tool_use", None
    word = h.stopping_word
    if h.finish_reason == FinishReason.STOP and word and word in job.params.stop and word not in job.extra_stops:
        return "stop_sequence", word
    return "end_turn", None


def _input(arguments: str) -> dict:
    try:
        v = json.loads(arguments)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


class AnthropicShape(Shape):
    kind = KIND_ANTHROPIC
    id_prefix = "msg_"
    n_predict_names = ("max_tokens",)
    reads_messages = True
    ends_with_done = False

    @classmethod
    def chat_body(cls, body: Any, info: Any = None) -> tuple[dict, None]:
        return to_chat_body(body), None

    @classmethod
    def error_body(cls, e: ApiError) -> dict:
        return error_json(e)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reader = ChatOutput(self.job.chat) if self.job.chat is not None else None
        self.said = ""
        self.started = False
        self.open: tuple[str, int] | None = None  # the open block: (kind, index)
        self.n_blocks = 0
        self.has_calls = False
        self.call_blocks: dict[int, int] = {}  # a call's index in ChatOutput -> its block's

    # -- a stream -----------------------------------------------------------------------------

    def _start(self, h) -> Iterator[Event]:
        """message_start, once the prompt is admitted (the cache's share is known then)."""
        if self.started:
            return
        self.started = True
        msg = {"id": self.job.id, "type": "message", "role": "assistant", "content": [],
               "model": self.ctx.model_name, "stop_reason": None, "stop_sequence": None,
               "usage": {**usage(h), "output_tokens": 0}}
        yield Event("message_start", {"type": "message_start", "message": msg})
        yield Event("ping", {"type": "ping"})

    def _close(self) -> Iterator[Event]:
        if self.open is None:
            return
        kind, index = self.open
        if kind == "thinking":  # Anthropic's clients expect a signature; a local model has none
            yield self._delta(index, {"type": "signature_delta", "signature": ""})
        yield Event("content_block_stop", {"type": "content_block_stop", "index": index})
        self.open = None

    def _open(self, kind: str, block: dict) -> Iterator[Event]:
        yield from self._close()
        self.open = (kind, self.n_blocks)
        yield Event("content_block_start", {"type": "content_block_start", "index": self.n_blocks,
                                            "content_block": block})
        self.n_blocks += 1

    @staticmethod
    def _delta(index: int, delta: dict) -> Event:
        return Event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def _in_block(self, kind: str, block: dict, delta: dict) -> Iterator[Event]:
        if self.open is None or self.open[0] != kind:
            yield from self._open(kind, block)
        yield self._delta(self.open[1], delta)

    def _events(self, delta: dict) -> Iterator[Event]:
        """Anthropic's events for one of ChatOutput's deltas (OpenAI's shape)."""
        if delta.get("reasoning_content"):
            yield from self._in_block("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                                      {"type": "thinking_delta", "thinking": delta["reasoning_content"]})
        if delta.get("content"):
            yield from self._in_block("text", {"type": "text", "text": ""},
                                      {"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            if "id" in call:  # a call's header: a new tool_use block
                self.has_calls = True
                yield from self._open("tool_use", {"type": "tool_use", "id": call["id"],
                                                   "name": fn.get("name", ""), "input": {}})
                self.call_blocks[call["index"]] = self.n_blocks - 1
            if fn.get("arguments"):
                index = self.call_blocks[call["index"]]
                yield self._delta(index, {"type": "input_json_delta", "partial_json": fn["arguments"]})

    def on_chunk(self, h, chunk, text: str, n_predicted: int) -> Iterator[object]:
        yield from self._start(h)
        if self.reader is None:
            if text:
                yield from self._events({"content": text})
            return
        self.said += text
        for delta in self.reader.deltas(self.said):
            yield from self._events(delta)

    def error(self, h) -> dict:
        return error_json(handle_error(h, self.ctx.closing()))

    def ending(self, h, done: bool) -> Iterator[object]:
        if self.failed(h):
            yield Event("error", self.error(h))
            return
        yield from self._start(h)
        if self.reader is not None:
            for delta in self.reader.deltas(self.said, final=True):
                yield from self._events(delta)
        yield from self._close()
        reason, seq = stop_reason(h, self.job, self.has_calls)
        yield Event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": reason, "stop_sequence": seq},
                                      "usage": usage(h)})
        yield Event("message_stop", {"type": "message_stop"})

    # -- whole answers ------------------------------------------------------------------------

    def answer(self, h, text: str) -> dict:
        blocks: list[dict] = []
        calls: list[dict] = []
        if self.job.chat is None:
            content = text
        else:
            msg = ChatOutput(self.job.chat).message(text)
            if msg.get("reasoning_content"):
                blocks.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
            content = msg.get("content") or ""
            calls = msg.get("tool_calls") or []
        if content:
            blocks.append({"type": "text", "text": content})
        for c in calls:
            blocks.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                           "input": _input(c["function"]["arguments"])})
        reason, seq = stop_reason(h, self.job, bool(calls))
        return {"id": self.job.id, "type": "message", "role": "assistant", "model": self.ctx.model_name,
                "content": blocks, "stop_reason": reason, "stop_sequence": seq, "usage": usage(h)}

    @classmethod
    def merge(cls, job: Job, answers: list[dict], handles: list) -> dict:
        """Anthropic has no `n`: one answer."""
        return answers[0]
