"""Callbacks of requests submitted with `on_chunk` / `on_done`, run off the engine thread.

The engine thread only queues: each write to such a request schedules the request's mailbox on
one of a few callback threads (EngineConfig.callback_threads), which deliver that request's
chunks in order and then call on_done exactly once, whatever the finish reason. So a slow
callback holds back its own request's deliveries (and one callback thread), never the engine's
decoding; a callback that raises fails its request (FinishReason.ERROR, the exception in
`request.error`, the slot freed at the next step) and nothing else.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from .request import _END, Request
from .types import Chunk

log = logging.getLogger("llama_lib.engine")

OnChunk = Callable[[Chunk], None]
OnDone = Callable[[Request], None]


class CallbackRunner:
    """A few threads that run mailboxes, one mailbox per request with callbacks."""

    def __init__(self, n_threads: int):
        if n_threads < 1:
            raise ValueError("callback_threads must be at least 1")
        self._n = n_threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def attach(self, req: Request, on_chunk: OnChunk | None, on_done: OnDone | None) -> None:
        """Deliver `req`'s output to the callbacks (call before the engine can write to it)."""
        self._start()
        req._listener = _Mailbox(req, on_chunk, on_done, self._jobs.put).notify

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then stop the threads; a callback still running after
        `timeout` seconds is left behind (the threads are daemons) with a warning."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join(timeout)
            if t.is_alive():
                log.warning("a request callback is still running after %.0f s; not waiting for it", timeout)

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self._n:
                t = threading.Thread(target=self._work, name=f"llama-callbacks-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _work(self) -> None:
        while (box := self._jobs.get()) is not None:
            box.drain()


class _Mailbox:
    """One request's pending deliveries; at most one callback thread drains it at a time."""

    def __init__(self, req: Request, on_chunk: OnChunk | None, on_done: OnDone | None,
                 schedule: Callable[["_Mailbox"], None]):
        self.req, self.on_chunk, self.on_done = req, on_chunk, on_done
        self._schedule = schedule
        self._lock = threading.Lock()
        self._scheduled = False

    def notify(self) -> None:
        """After each write to the request (the engine thread): make sure a drain will run."""
        if self.on_chunk is None and not self.req.done:
            return
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self._schedule(self)

    def drain(self) -> None:
        r = self.req
        while True:
            item = self._take()
            if item is None:
                with self._lock:  # a write that came after _take() either sees this flag
                    if not self._pending():  # cleared and schedules, or is seen pending here
                        self._scheduled = False
                        return
                continue
            if item is _END:
                self._finish()
                return
            if self.on_chunk is not None and r._failure is None:
                try:
                    self.on_chunk(item)
                except Exception as e:
                    log.exception("on_chunk of request %d raised; failing that request", r.id)
                    r.fail(f"on_chunk raised {type(e).__name__}: {e}")

    def _take(self):
        """The next chunk (or the end) to deliver, None when there is none yet."""
        if self.on_chunk is None:  # the stream stays for iteration; only the end matters
            return _END if self.req.done else None
        try:
            return self.req._stream.get_nowait()
        except queue.Empty:
            return None

    def _pending(self) -> bool:
        return self.req.done if self.on_chunk is None else not self.req._stream.empty()

    def _finish(self) -> None:
        r = self.req
        if self.on_chunk is not None:
            r._stream.put(_END)  # as after an iteration: a later one ends at once
        # returning without clearing _scheduled: nothing is delivered after on_done
        if self.on_done is not None:
            try:
                self.on_done(r)
            except Exception:
                log.exception("on_done of request %d raised", r.id)
