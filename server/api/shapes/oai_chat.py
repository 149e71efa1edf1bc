"""OpenAI's chat completions: `POST /v1/chat/completions`.

Streamed: `chat.completion.chunk`s: first the delta {"role": "assistant", "content": null},
then the answer's deltas (`reasoning_content`, `content`, `tool_calls` fragments when the job
has a chat plan, read by server.chat.output), a finish chunk with an empty delta, with
stream_options.include_usage a last chunk without choices carrying usage, then [DONE].
Whole: one `chat.completion` with the assistant's message.
"""

from __future__ import annotations

from typing import Iterator

from ...chat.output import ChatOutput
from ..job import KIND_OAI_CHAT
from .common import probs_json, progress_json, timings, usage
from .completion import chunk_probs
from .openai import OpenAIShape, oai_finish_reason


def chat_finish_reason(h, has_calls: bool) -> str | None:
    """A chat's finish_reason: "tool_calls" when the answer is calls (unless cut by length)."""
    reason = oai_finish_reason(h.finish_reason)
    return "tool_calls" if has_calls and reason == "stop" else reason


class OaiChatShape(OpenAIShape):
    kind = KIND_OAI_CHAT
    id_prefix = "chatcmpl-"
    n_predict_names = ("max_completion_tokens", "max_tokens", "n_predict")
    reads_messages = True
    obj = "chat.completion"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # the answer read as it grows (reasoning, tool calls); None: plain content deltas
        self.reader = ChatOutput(self.job.chat) if self.job.chat is not None else None
        self.said = ""
        self.pending_probs: list = []

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        out = self.head("chat.completion.chunk")
        out["choices"] = [{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return out

    def opening(self) -> Iterator[object]:
        yield self.chunk({"role": "assistant", "content": None})

    def on_chunk(self, h, chunk, text: str, n_predicted: int) -> Iterator[object]:
        if self.reader is None:
            if text:
                ev = self.chunk({"content": text})
                if chunk.probs:
                    ev["choices"][0]["logprobs"] = {"content": chunk_probs(chunk, text, self.ctx.token_piece)}
                yield ev
            return
        self.said += text
        self.pending_probs += chunk.probs or []
        for delta in self.reader.deltas(self.said):
            ev = self.chunk(delta)
            if self.pending_probs:
                ev["choices"][0]["logprobs"] = {"content": probs_json(self.pending_probs, self.ctx.token_piece)}
                self.pending_probs = []
            yield ev

    def on_progress(self, h, progress, timings: dict | None) -> Iterator[object]:
        # llama-server repeats the opening delta with each progress report
        ev = self.chunk({"role": "assistant", "content": None})
        if timings is not None:
            ev["timings"] = timings
        ev["prompt_progress"] = progress_json(progress)
        yield ev

    def last_chunks(self, h) -> Iterator[dict]:
        reason = oai_finish_reason(h.finish_reason)
        if self.reader is not None:
            for delta in self.reader.deltas(self.said, final=True):
                yield self.chunk(delta)
            reason = chat_finish_reason(h, self.reader.sent_calls)
        # the finish chunk (empty delta); with stream_options.include_usage a last chunk
        # without choices carries usage; timings ride on whichever comes last
        last = self.chunk({}, reason)
        verbose = self.verbose(h)
        if verbose is not None:
            last["__verbose"] = verbose
        if self.job.include_usage:
            yield last
            last = self.head("chat.completion.chunk")
            last["choices"] = []
            last["usage"] = usage(h)
        last["timings"] = timings(h)
        yield last

    def answer(self, h, text: str) -> dict:
        res = self.result_object(h, text)
        choice = {"index": self.index}
        if self.job.chat is None:
            choice["message"] = {"role": "assistant", "content": text}
            return self.whole(h, res, choice)
        message = ChatOutput(self.job.chat).message(text)
        choice["message"] = message
        return self.whole(h, res, choice, chat_finish_reason(h, "tool_calls" in message))
