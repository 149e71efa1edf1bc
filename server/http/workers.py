"""The handler threads: at most `--threads-http` of them, each serving one request at a time.

Threads start when there is more work than idle threads and end after WORKER_IDLE_EXIT seconds
without any; an idle thread waits on the queue (no polling). A request that finds every thread
busy waits in the queue for the next free one.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("server.http")

WORKER_IDLE_EXIT = 5.0  # seconds an idle handler thread waits for work before it ends


class HandlerPool:
    """`submit(item)` runs `serve(item)` on one of at most `max_threads` threads; what
    `serve` returns, if not None, is called once the thread counts as idle again."""

    def __init__(self, max_threads: int, serve: Callable[[Any], None], name: str = "http"):
        self.max_threads = max(1, max_threads)
        self._serve = serve
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._pending = 0   # submitted, not yet taken by a thread
        self._started = 0
        self._closed = False

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, item: Any) -> None:
        with self._lock:
            self._pending += 1
            if self._pending > self._idle and self._threads < self.max_threads and not self._closed:
                self._threads += 1
                self._started += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._started}",
                                 daemon=True).start()
        self._queue.put(item)

    def close(self) -> None:
        """Let every thread end once it is idle (requests in flight finish)."""
        with self._lock:
            self._closed = True
            n = self._threads
        for _ in range(n):
            self._queue.put(None)

    def _work(self) -> None:
        then = None  # what the last item asked to run once this thread is idle again
        while True:
            with self._lock:
                self._idle += 1
            if then is not None:
                try:
                    then()
                except Exception:
                    log.exception("error in an HTTP handler thread")
            try:
                item = self._queue.get(timeout=WORKER_IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._pending == 0 or self._closed:
                        self._threads -= 1
                        return
                then = None
                continue  # work arrived as the wait ended: it is this thread's
            with self._lock:
                self._idle -= 1
                if item is None:
                    self._threads -= 1
                    return
                self._pending -= 1
            try:
                then = self._serve(item)
            except Exception:  # a bug in a handler must not end the thread silently
                log.exception("error in an HTTP handler thread")
                then = None
