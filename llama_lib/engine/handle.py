"""What every handle of submitted work has, a generation request's (request.py) or an
embedding request's (embedding.py): the same names for the same things.

The engine thread writes a handle and ends it once; any thread reads it, waits for it or
cancels it. Once `done` is true, every field is final.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .types import FinishReason, Timings


class Handle:
    """id, timings, finish_reason and error; done / wait() / cancel() / cancelled."""

    kind = "request"  # how errors name it

    def __init__(self, rid: int):
        self.id = rid
        self.timings = Timings(submitted=time.perf_counter())
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._wake_engine: Callable[[], None] | None = None  # set by the engine

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was asked (or the engine cancelled it at close())."""
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True), or False after `timeout` seconds."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop the work; the engine frees what it holds within one step."""
        if self._done.is_set():
            return
        self._cancel.set()
        if self._wake_engine is not None:
            self._wake_engine()

    def _wait_or_raise(self, timeout: float | None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.kind} {self.id} not finished after {timeout} s")

    def _record_end(self, reason: FinishReason, error: str | None) -> None:
        """The final fields, set by the engine thread just before `done`."""
        self.finish_reason = reason
        self.error = error
        self.timings.done = time.perf_counter()
