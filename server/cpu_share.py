"""In a router's child: the share of the cores the router gives this model (server.router.cores).

The router writes `cpus 0,1` lines (and `cache-off` before it stops, server.saved_cache) to a pipe it hands the child (`PYLLAMA_CONTROL_FD`); a thread
here reads them and has the engine apply each one between two steps (llama_lib.engine.cpu_share:
every thread of the process pinned to the share, each context at min(-t, CPUs) threads). The
last share is kept and applied again when the model is loaded again (after sleeping). /props
shows the share applied as `cpu_share` (our addition; null when no router gave one).
"""

from __future__ import annotations

import logging
import os
import threading

from llama_lib.engine.cpu_share import share_cpus

from . import saved_cache

log = logging.getLogger("server")
CONTROL_ENV = "PYLLAMA_CONTROL_FD"


class CpuShare:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpus: tuple[int, ...] | None = None  # the last share the router gave
        self.view: dict | None = None             # what was applied, for /props

    def set(self, cpus: tuple[int, ...], engine) -> None:
        with self._lock:
            self.cpus = cpus
            self._apply(engine)

    def apply(self, engine) -> None:
        """After a (re)load: the last share on the new engine."""
        with self._lock:
            self._apply(engine)

    def _apply(self, engine) -> None:
        if self.cpus is None or engine is None:
            return
        try:
            self.view = share_cpus(engine, self.cpus)
            log.debug("cores from the router: %s", self.view)
        except Exception as e:  # the engine closing (sleep, shutdown): applied at the next load
            log.debug("cores from the router not applied now: %s", e)


def listen_router(service) -> None:
    """Read the router's control pipe in a thread (nothing to do without a router)."""
    fd = os.environ.get(CONTROL_ENV)
    if not fd:
        return

    def run() -> None:
        with os.fdopen(int(fd), "rb", buffering=0) as f:
            for raw in f:
                word, _, arg = raw.decode().strip().partition(" ")
                if word == "cpus" and arg:
                    service.cpu_share.set(tuple(int(c) for c in arg.split(",")), service.engine)
                elif word == "cache-off":  # the router stops: no prompt cache to keep
                    saved_cache.turn_off()

    threading.Thread(target=run, name="router-control", daemon=True).start()
