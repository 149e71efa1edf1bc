"""`--sleep-idle-seconds N`: free the model after N seconds without work, load it again on demand.

`IdleSleep` knows nothing of models: it counts the requests that use the model (`awake()`, a
context manager held for a whole request, stream included), and a thread of its own waits on a
condition variable (no polling) until nothing has run for N seconds, then calls `fall_asleep`
(free the engine, its contexts and KV, and the model). The next `awake()` calls `wake` (load
again) before its request goes on; requests that come meanwhile wait for that one load. Going to
sleep and waking happen under one lock, and a request counted before the thread decides keeps
the model awake, so no request ever sees a model being freed under it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

log = logging.getLogger("server")


class IdleSleep:
    def __init__(self, seconds: float, fall_asleep: Callable[[], None], wake: Callable[[], None],
                 before: Callable[[], None] = lambda: None):
        self.seconds = seconds
        self._fall_asleep = fall_asleep
        self._wake = wake
        self._before = before  # called once it is decided, before `sleeping` is set: a last look
        self._cond = threading.Condition()
        self._switch = threading.Lock()  # held while falling asleep or waking
        self._busy = 0
        self._last = time.monotonic()
        self._stopped = False
        self.sleeping = False
        self.n_sleeps = 0
        self.on_change: Callable[[bool], None] | None = None  # told True on sleeping, False on waking
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.seconds > 0 and self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="idle-sleep", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Hold the model awake for one request; wakes it first if it sleeps. A failed reload
        raises here (the request gets its error) and leaves it asleep for the next one to try."""
        with self._cond:
            self._busy += 1
            asleep = self.sleeping
        try:
            if asleep:
                with self._switch:
                    if self.sleeping:
                        t0 = time.perf_counter()
                        self._wake()
                        with self._cond:
                            self.sleeping = False
                            self._cond.notify_all()
                        log.info("woke up: the model is loaded again (%.2f s)", time.perf_counter() - t0)
                        if self.on_change is not None:
                            self.on_change(False)
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._last = time.monotonic()
                self._cond.notify_all()

    def _idle_for(self) -> float | None:
        """Seconds left before sleeping, 0 when due, None while busy or already asleep."""
        if self._busy or self.sleeping:
            return None
        return max(0.0, self.seconds - (time.monotonic() - self._last))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and self._idle_for() != 0.0:
                    self._cond.wait(self._idle_for())
                if self._stopped:
                    return
            with self._switch:
                with self._cond:  # a request counted since the check keeps it awake
                    if self._idle_for() != 0.0 or self._stopped:
                        continue
                    self._before()
                    self.sleeping = True
                try:
                    self._fall_asleep()
                    self.n_sleeps += 1
                    if self.on_change is not None:
                        self.on_change(True)
                    log.info("sleeping after %g s idle: the model, its contexts and KV are freed",
                             self.seconds)
                except Exception:
                    log.exception("could not go to sleep")


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), so that RSS drops
    once the model and its buffers are freed; a no-op where there is no glibc."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
