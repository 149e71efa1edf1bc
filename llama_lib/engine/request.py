"""The handle of a submitted request: its output stream, its result and its cancellation.

The engine thread writes a Request; any thread reads it, iterates its chunks or cancels it.
Coroutines read it too (`async for chunk in request`, `await request.aresult()`) without a
thread of their own: a reader waiting on an event loop leaves a one-shot waker, and the engine
thread, after writing, hands it to that loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np

from .handle import Handle
from .types import Chunk, FinishReason, Progress, RequestParams, TokenProbs

_END = object()


class Request(Handle):
    """Handle of a submitted request: iterate it to stream `Chunk`s, `cancel()` it any time.

    The engine thread writes; any thread may read. Once `done` is set, every field is final
    (id, timings, finish_reason, error, done, wait, cancel: handle.py).
    """

    def __init__(self, rid: int, prompt_tokens: np.ndarray, params: RequestParams):
        super().__init__(rid)
        self.params = params
        self.prompt_tokens = prompt_tokens      # the prompt after the shared system prompt
        # Set at admission: prompt tokens decoded (llama-server's prompt_n) and those found in
        # the slot's KV cache, system prompt included (cache_n). Until then: all / none.
        self.n_prompt_tokens = len(prompt_tokens)
        self.n_cached_tokens = 0
        self.tokens: list[int] = []             # generated token ids
        self.text_parts: list[str] = []         # emitted text (stop strings cut off)
        # with params.n_probs > 0: one entry per generated token that was emitted (an
        # end-of-generation token that ends the request has none)
        self.probs: list[TokenProbs] = []
        self.stopping_word = ""
        # llama-server's "truncated": the context was shifted (ctx_shift.py) or the slot filled
        self.truncated = False
        self.controls = None  # n_indent / t_max_predict_ms state (controls.LineControls), if any
        self.slot_id = -1
        self.parked = None  # preempt.Parked while its KV waits in host RAM for a slot
        self._stream: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = None  # the engine's Outbox: a step's output reaches readers at its end
        # Who is told of new output: one-shot wakers of waiting coroutines (any output, or the
        # end only) and a listener that stays (the callback runner). _lock orders a write and
        # the wakers it takes against a reader that finds nothing and leaves a waker.
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []
        self._done_wakers: list[Callable[[], None]] = []
        self._listener: Callable[[], None] | None = None
        self._failure: str | None = None  # set by fail(): the engine ends the request with it

    # -- reading ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Chunk | Progress]:
        """Yield chunks as they are produced, until the request finishes (with
        params.return_progress, `Progress` items too, before the first chunk)."""
        while True:
            item = self._stream.get()
            if item is _END:
                self._stream.put(_END)  # a second iteration ends at once too
                return
            yield item

    def next_chunk(self, timeout: float | None = None) -> Chunk | Progress | None:
        """The next chunk, None once finished. Raises queue.Empty after `timeout` seconds."""
        item = self._stream.get(timeout=timeout)
        if item is _END:
            self._stream.put(_END)
            return None
        return item

    def __aiter__(self) -> "_AsyncChunks":
        """`async for chunk in request` on any event loop. Cancelling the task that awaits
        cancels the request (its slot is freed at the engine's next step)."""
        return _AsyncChunks(self)

    async def aresult(self) -> str:
        """Await the end and return the whole text (the stream is left for others to read).
        Cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._done.is_set():
                    return self.text
                fut = loop.create_future()
                self._done_wakers.append(_waker(loop, fut))
            await _await_or_cancel(self, fut)

    def result(self, timeout: float | None = None) -> str:
        """Block until finished and return the whole text."""
        self._wait_or_raise(timeout)
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    def fail(self, error: str) -> None:
        """End the request with FinishReason.ERROR and `error` (e.g. its callback raised):
        as cancel(), but reported as a failure."""
        self._failure = error
        self.cancel()

    @property
    def cancel_reason(self) -> tuple[FinishReason, str | None]:
        """How the engine ends a request whose cancel flag is set."""
        if self._failure is not None:
            return FinishReason.ERROR, self._failure
        return FinishReason.CANCELLED, None

    # -- engine side ------------------------------------------------------------------------

    def _emit(self, text: str, tokens: list[int], probs: list[TokenProbs] | None = None) -> None:
        if text:
            self.text_parts.append(text)
        if probs:
            self.probs.extend(probs)
        if text or tokens:
            self._put(Chunk(text, tokens, probs))

    def _progress(self, n_done: int) -> None:
        """Report that the first n_done tokens of `prompt_tokens` are in the KV cache (only
        called for a request with params.return_progress)."""
        total = self.n_cached_tokens + self.n_prompt_tokens
        elapsed_ms = (time.perf_counter() - self.timings.started) * 1e3
        self._put(Progress(total, self.n_cached_tokens, total - len(self.prompt_tokens) + n_done,
                           elapsed_ms))

    def _finish(self, reason: FinishReason, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self._record_end(reason, error)
        if not self.timings.prompt_done:
            self.timings.prompt_done = self.timings.done
        if not self.timings.started:
            self.timings.started = self.timings.done
        with self._lock:
            self._done.set()
            done, self._done_wakers = self._done_wakers, []
        self._put(_END)
        for wake in done:
            wake()

    def _put(self, item) -> None:
        """Queue an item for the readers: at the end of the engine's step (outbox.py), or now."""
        box = self._outbox
        if box is None or not box.hold(self._deliver, item):
            self._deliver(item)

    def _deliver(self, item) -> None:
        """Queue an item and wake whoever waits for one (outside the lock)."""
        with self._lock:
            self._stream.put(item)
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()
        if self._listener is not None:
            self._listener()


class _AsyncChunks:
    """The async iterator of a Request: takes what is queued, else awaits a waker."""

    def __init__(self, req: Request):
        self.req = req

    def __aiter__(self) -> "_AsyncChunks":
        return self

    async def __anext__(self) -> Chunk | Progress:
        r = self.req
        loop = asyncio.get_running_loop()
        while True:
            with r._lock:
                try:
                    item = r._stream.get_nowait()
                except queue.Empty:
                    fut = loop.create_future()
                    r._wakers.append(_waker(loop, fut))
                    item = None
            if item is _END:
                r._stream.put(_END)  # a second iteration ends at once too
                raise StopAsyncIteration
            if item is not None:
                return item
            await _await_or_cancel(r, fut)


def _waker(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> Callable[[], None]:
    """A function for the engine thread that resolves `fut` on its own loop."""
    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_resolve, fut)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass
    return wake


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def _await_or_cancel(req: Request, fut: asyncio.Future) -> None:
    try:
        await fut
    except asyncio.CancelledError:
        req.cancel()
        raise
