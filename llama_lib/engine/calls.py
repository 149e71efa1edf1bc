"""Work that other threads hand to the engine thread (state reads such as seq_pos_max): only
that thread touches the llama_context, so a reader queues a function and waits for its result."""

from __future__ import annotations

import collections
from concurrent.futures import Future
from typing import Any, Callable


class CallQueue:
    """Functions to run on the engine thread between two steps, each with a Future for its result.
    `put` is called with the engine's lock held; `run` and `fail` by the engine thread."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._items)

    def put(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._items.append((fn, fut))
        return fut

    def run(self) -> None:
        """Run every queued function; its result or exception goes to its Future."""
        while self._items:
            fn, fut = self._items.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)

    def fail(self, error: Exception) -> None:
        """Fail every queued function with `error` (at shutdown)."""
        while self._items:
            self._items.popleft()[1].set_exception(error)
