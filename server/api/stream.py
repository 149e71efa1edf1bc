"""The stream of one request: a generator of server-sent events in llama-server's order.

Each item is a dict (one `data: {...}` event) or `DONE` (`data: [DONE]`); the HTTP layer only
writes them. Closing the generator early (the client went away) cancels the request, whose
slot is then freed at the engine's next step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Protocol

from llama_lib import FinishReason

from . import responses as R
from ..chat.output import ChatOutput
from .requests import KIND_COMPLETION, KIND_OAI_CHAT, Job

DONE = object()  # in a stream: write `data: [DONE]`


class Streamer(R.Answerer, Protocol):
    """What a stream needs from the running server beyond building answers."""

    closing: bool  # shutting down: a cancelled request ends with a 503 error event

    def record(self, h) -> None:
        """Count a finished handle in the metrics."""


def no_watch(_handle):
    """The default `watch`: nobody to watch (in-process callers)."""
    return contextlib.nullcontext([])


def stream_one(srv: Streamer, job: Job, h, watch=no_watch) -> Iterator[object]:
    """The events of one submitted handle, watched (see Service.complete) while they flow."""
    try:
        with watch(h):
            yield from handle_events(srv, job, h)
    finally:
        h.cancel()  # no-op when finished; frees the slot when the client went away


def _chunk_probs(srv: Streamer, chunk, text: str) -> list[dict]:
    """A streamed chunk's probabilities; a chunk is one token, sent with `text` (its text
    after the leading-whitespace strip, if any)."""
    entries = chunk.probs
    if len(entries) == 1 and entries[0].text != text:
        entries = [dataclasses.replace(entries[0], text=text)]
    return R.probs_json(entries, srv.token_piece)


def handle_events(srv: Streamer, job: Job, h, index: int = 0, done: bool = True) -> Iterator[object]:
    """The SSE events of one handle, in llama-server's order and shapes. `index` is the
    choice's index (n > 1, several prompts); `done` ends with `data: [DONE]`."""
    model = srv.model_name
    if job.kind == KIND_OAI_CHAT:  # OpenAI's first delta: the role, content null
        yield R.oai_chat_chunk(job, model, {"role": "assistant", "content": None}, index=index)
    n = 0
    strip = job.strip_leading
    reader = ChatOutput(job.chat) if job.kind == KIND_OAI_CHAT and job.chat is not None else None
    said, pending_probs = "", []
    for chunk in h:
        n += len(chunk.tokens)
        text = chunk.text
        if strip:
            text = text.lstrip()
            strip = not text
        if job.kind == KIND_COMPLETION:
            ev = R.completion_chunk(h, text, chunk.tokens, n, index)
            if chunk.probs:
                ev["completion_probabilities"] = _chunk_probs(srv, chunk, text)
            yield ev
        elif reader is not None:
            said += text
            pending_probs += chunk.probs or []
            for delta in reader.deltas(said):
                ev = R.oai_chat_chunk(job, model, delta, index=index)
                if pending_probs:
                    ev["choices"][0]["logprobs"] = {"content": R.probs_json(pending_probs, srv.token_piece)}
                    pending_probs = []
                yield ev
        elif text:
            if job.kind == KIND_OAI_CHAT:
                ev = R.oai_chat_chunk(job, model, {"content": text}, index=index)
            else:
                ev = R.oai_completion_chunk(job, model, text, index=index)
            if chunk.probs:
                ev["choices"][0]["logprobs"] = {"content": _chunk_probs(srv, chunk, text)}
            yield ev
    srv.record(h)
    failed = h.finish_reason == FinishReason.ERROR or (
        h.finish_reason == FinishReason.CANCELLED and srv.closing)
    final = R.completion_result(h, job, model, srv.n_ctx_slot, "", srv.prompt_text(h, job), index)
    if job.kind == KIND_COMPLETION:
        final = R.project_fields(final, job.response_fields)
        if failed:
            final["error"] = R.handle_error(h, srv.closing).body()["error"]
        yield final
        return
    if failed:
        yield R.handle_error(h, srv.closing).body()
        if done:
            yield DONE
        return
    reason = R.oai_finish_reason(h.finish_reason)
    if reader is not None:
        for delta in reader.deltas(said, final=True):
            yield R.oai_chat_chunk(job, model, delta, index=index)
        reason = R.chat_finish_reason(h, reader.sent_calls)
    if job.kind == KIND_OAI_CHAT:
        # the finish chunk (empty delta); with stream_options.include_usage a last chunk
        # without choices carries usage; timings ride on whichever comes last
        last = R.oai_chat_chunk(job, model, {}, reason, index=index)
        if job.verbose:
            last["__verbose"] = final
        if job.include_usage:
            yield last
            last = R.oai_usage_chunk(h, job, model)
        else:
            last["timings"] = R.timings(h)
    else:
        # /v1/completions: the final chunk always carries usage, as llama-server's
        last = R.oai_completion_chunk(job, model, "", reason, index=index)
        last["usage"] = R.usage(h)
        if job.verbose:
            last["__verbose"] = final
        last["timings"] = R.timings(h)
    yield last
    if done:
        yield DONE
