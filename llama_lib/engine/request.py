"""The handle of a submitted request: its output stream, its result and its cancellation.

The engine thread writes a Request; any thread reads it, iterates its chunks or cancels it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np

from .types import Chunk, FinishReason, RequestParams, TokenProbs, Timings

_END = object()


class Request:
    """Handle of a submitted request: iterate it to stream `Chunk`s, `cancel()` it any time.

    The engine thread writes; any thread may read. Once `done` is set, every field is final.
    """

    def __init__(self, rid: int, prompt_tokens: np.ndarray, params: RequestParams):
        self.id = rid
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
        self.finish_reason: FinishReason | None = None
        self.stopping_word = ""
        self.error: str | None = None
        self.slot_id = -1
        self.timings = Timings(submitted=time.perf_counter())
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._stream: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_engine: Callable[[], None] | None = None  # set by the engine

    # -- reading ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Chunk]:
        """Yield chunks as they are produced, until the request finishes."""
        while True:
            item = self._stream.get()
            if item is _END:
                self._stream.put(_END)  # a second iteration ends at once too
                return
            yield item

    def next_chunk(self, timeout: float | None = None) -> Chunk | None:
        """The next chunk, None once finished. Raises queue.Empty after `timeout` seconds."""
        item = self._stream.get(timeout=timeout)
        if item is _END:
            self._stream.put(_END)
            return None
        return item

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> str:
        """Block until finished and return the whole text."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating; the slot and its KV cells are freed within one engine step."""
        if self._done.is_set():
            return
        self._cancel.set()
        if self._wake_engine is not None:
            self._wake_engine()

    # -- engine side ------------------------------------------------------------------------

    def _emit(self, text: str, tokens: list[int], probs: list[TokenProbs] | None = None) -> None:
        if text:
            self.text_parts.append(text)
        if probs:
            self.probs.extend(probs)
        if text or tokens:
            self._stream.put(Chunk(text, tokens, probs))

    def _finish(self, reason: FinishReason, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        self.error = error
        self.timings.done = time.perf_counter()
        if not self.timings.prompt_done:
            self.timings.prompt_done = self.timings.done
        if not self.timings.started:
            self.timings.started = self.timings.done
        self._done.set()
        self._stream.put(_END)
