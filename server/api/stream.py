"""The stream of one request: a generator of server-sent events in llama-server's order.

Each item is a dict (one `data: {...}` event) or `DONE` (`data: [DONE]`); the HTTP layer only
writes them. The job's shape (server.api.shapes) formats every event; this loop only reads the
handle. Closing the generator early (the client went away) cancels the request, whose slot is
then freed at the engine's next step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .job import Job
from .shapes import DONE, AnswerContext, shape_for

__all__ = ["DONE", "handle_events", "no_watch", "stream_one"]


def no_watch(_handle):
    """The default `watch`: nobody to watch (in-process callers)."""
    return contextlib.nullcontext([])


def stream_one(ctx: AnswerContext, job: Job, h, watch=no_watch) -> Iterator[object]:
    """The events of one submitted handle, watched (see Service.run_to_end) while they flow."""
    try:
        with watch(h):
            yield from handle_events(ctx, job, h)
    finally:
        h.cancel()  # no-op when finished; frees the slot when the client went away


def handle_events(ctx: AnswerContext, job: Job, h, index: int = 0, done: bool = True) -> Iterator[object]:
    """The SSE events of one handle in its job's shape. `index` is the choice's index (n > 1,
    several prompts); `done`: this stream writes the format's `data: [DONE]`, if it has one."""
    shape = shape_for(job.kind)(job, ctx, index)
    yield from shape.opening()
    n = 0
    strip = job.strip_leading
    for chunk in h:
        n += len(chunk.tokens)
        text = chunk.text
        if strip:
            text = text.lstrip()
            strip = not text
        yield from shape.on_chunk(h, chunk, text, n)
    ctx.record(h)
    yield from shape.ending(h, done and shape.ends_with_done)
