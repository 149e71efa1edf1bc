"""The stream of one request: a generator of server-sent events in llama-server's order.

Each item is a dict (one `data: {...}` event), `DONE` (`data: [DONE]`) or `PING` (the SSE
comment `:` that keeps a silent stream alive, llama-server's sse_ping_interval); the HTTP layer
only writes them. The job's shape (server.api.shapes) formats every event; this loop only reads
the handle. Closing the generator early (the client went away) cancels the request, whose slot
is then freed at the engine's next step.
"""

from __future__ import annotations

import contextlib
import queue
from typing import Iterator

from llama_lib import Progress

from .job import Job
from .shapes import DONE, AnswerContext, shape_for
from .shapes.common import progress_timings, timings

__all__ = ["DONE", "PING", "handle_events", "no_watch", "ping_wait", "stream_one"]

PING = object()  # in a stream: write the SSE comment ":" (nothing was sent for a while)


def ping_wait(job: Job) -> float | None:
    """How long a stream's reader waits for the next event before it sends PING (None: for
    ever). The wait is the queue's own timeout: nothing polls."""
    return float(job.sse_ping_interval) if job.sse_ping_interval > 0 else None


def no_watch(_handle):
    """The default `watch`: nobody to watch (in-process callers)."""
    return contextlib.nullcontext([])


def stream_one(ctx: AnswerContext, job: Job, h, watch=no_watch) -> Iterator[object]:
    """The events of one submitted handle, watched (see Service.run_to_end) while they flow."""
    try:
        with watch(h):
            yield from handle_events(ctx, job, h, ping=ping_wait(job))
    finally:
        h.cancel()  # no-op when finished; frees the slot when the client went away


def handle_events(ctx: AnswerContext, job: Job, h, index: int = 0, done: bool = True,
                  ping: float | None = None) -> Iterator[object]:
    """The SSE events of one handle in its job's shape. `index` is the choice's index (n > 1,
    several prompts); `done`: this stream writes the format's `data: [DONE]`, if it has one;
    `ping`: seconds of silence after which PING is yielded (None: never)."""
    shape = shape_for(job.kind)(job, ctx, index)
    yield from shape.opening()
    n = 0
    strip = job.strip_leading
    per_token = job.timings_per_token
    while True:
        try:
            item = h.next_chunk(ping)
        except queue.Empty:
            yield PING
            continue
        if item is None:
            break
        if isinstance(item, Progress):
            yield from shape.on_progress(h, item, progress_timings(item) if per_token else None)
            continue
        n += len(item.tokens)
        text = item.text
        if strip:
            text = text.lstrip()
            strip = not text
        if not per_token:
            yield from shape.on_chunk(h, item, text, n)
            continue
        events = list(shape.on_chunk(h, item, text, n))
        if events:  # llama-server puts them on the last event a chunk makes
            events[-1]["timings"] = timings(h, n)
        yield from events
    ctx.record(h)
    yield from shape.ending(h, done and shape.ends_with_done)
