"""The router's table of models: each one's status and child, loading on demand, unloading the
least recently used past `--models-max`, and the status events of /models/sse.

One condition variable guards the table; HTTP threads wait on it (bounded by the request's time
limit) and the children's threads notify it. A request holds its model (`hold`) from before the
load until its answer is sent, so a model that serves or is about to serve a request is never the
one given up. Requests that need a free place queue in arrival order, one entry per model: many
requests for one missing model cost one unload, not many.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import ApiError, ClientGone
from . import hf_cache
from .child import Child, cache_file, cache_folder
from .cores import CoreArbiter
from .presets import ModelSpec

log = logging.getLogger("server.router")

UNLOADED, LOADING, LOADED, SLEEPING = "unloaded", "loading", "loaded", "sleeping"


@dataclass
class Instance:
    spec: ModelSpec
    status: str = UNLOADED
    child: Child | None = None
    port: int = 0
    users: int = 0          # requests holding it (waiting for it or being answered)
    queued: int = 0         # of them, those waiting for a free place
    last_used: float = 0.0
    stopping: bool = False
    n_loads: int = 0
    failed: bool = False
    exit_code: int = 0
    error: str = ""
    args: list[str] = field(default_factory=list)
    cpus: tuple[int, ...] = ()  # the cores its child was last given (server.router.cores)

    @property
    def running(self) -> bool:
        return self.status != UNLOADED


class ModelTable:
    def __init__(self, specs: dict[str, ModelSpec], models_max: int, autoload: bool,
                 memory_mib: float = 0.0, share_cpus: bool = True):
        self.models = {name: Instance(spec) for name, spec in specs.items()}
        self.models_max = models_max
        self.memory_mib = memory_mib  # --models-memory: the loaded models' estimates fit in it
        self.autoload = autoload
        self._cond = threading.Condition()
        self._queue: list[str] = []  # models waiting for a free place, first come first
        self._subscribers: list[queue.SimpleQueue] = []
        self.closing = False
        self.cores = CoreArbiter(share_cpus)  # busy models' children on disjoint cores
        self.cache_dir = cache_folder()  # prompt caches kept across unloads (server.saved_cache)

    # -- lookup ---------------------------------------------------------------------------------

    def find(self, name: str) -> Instance | None:
        inst = self.models.get(name)
        if inst is None:
            inst = next((i for i in self.models.values() if name in i.spec.aliases), None)
        return inst

    def get(self, name: str, not_found: int = 400) -> Instance:
        if not name:
            raise ApiError(400, "invalid_request_error", "model name is missing from the request")
        inst = self.find(name)
        if inst is None:
            raise ApiError(not_found, "invalid_request_error" if not_found == 400 else "not_found_error",
                           f"model '{name}' not found")
        return inst

    # -- requests -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, inst: Instance) -> Iterator[None]:
        """Hold `inst` for one request, from before its load to the end of its answer: a model
        held is never the one unloaded to make room."""
        with self._cond:
            inst.users += 1
            self.cores.rebalance(self.models.values())
        try:
            yield
        finally:
            with self._cond:
                inst.users -= 1
                inst.last_used = time.monotonic()
                self.cores.rebalance(self.models.values())
                self._cond.notify_all()

    def ready(self, inst: Instance, autoload: bool, timeout: float,
              gone: Callable[[], bool] = lambda: False) -> tuple[int, str]:
        """Within `hold`: the port and key of `inst`'s child once it is loaded (loading it when autoload).
        `gone()` says the client left (`poke()` wakes the wait to see it)."""
        if not autoload and inst.status not in (LOADED, SLEEPING):
            raise ApiError(400, "invalid_request_error", "model is not loaded")
        return self._ready(inst, time.monotonic() + timeout, gone)

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _ready(self, inst: Instance, deadline: float, gone: Callable[[], bool]) -> tuple[int, str]:
        """Wait until `inst` is loaded, loading it (and unloading another) when its turn comes."""
        name = inst.spec.name
        with self._cond:
            entry, joined = inst.n_loads, False
            try:
                while True:
                    if self.closing:
                        raise ApiError(503, "unavailable_error", "the server is shutting down")
                    if gone():
                        raise ClientGone()
                    if inst.status in (LOADED, SLEEPING) and not inst.stopping:
                        return inst.port, inst.child.key
                    if inst.status == UNLOADED and not inst.stopping:
                        if inst.failed and inst.n_loads > entry:  # loaded since we came, and failed
                            raise ApiError(500, "server_error", f"model '{name}' failed to load: "
                                           f"{inst.error or f'exit code {inst.exit_code}'}")
                        if not joined:
                            inst.queued, joined = inst.queued + 1, True
                        if name not in self._queue:
                            self._queue.append(name)
                        if self._take_place(inst):
                            continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ApiError(503, "unavailable_error",
                                       f"model '{name}' is not ready (status: {inst.status}); retry later")
                    self._cond.wait(left)
            finally:
                if joined:
                    inst.queued -= 1
                    if inst.queued == 0 and name in self._queue:
                        self._queue.remove(name)
                        self._cond.notify_all()

    def _take_place(self, inst: Instance) -> bool:
        """Under the lock, `inst` queued: start loading it if its turn came and a place is free,
        else unload the least recently used idle model (one at a time). True when it started."""
        name = inst.spec.name
        if self._queue[0] != name:
            return False
        running = [i for i in self.models.values() if i.running]
        need, limit = inst.spec.memory_mib, self.memory_mib
        if limit and need > limit:
            inst.failed, inst.exit_code = True, 0
            inst.error = (f"model '{name}' needs about {need:.0f} MiB (weights, KV cache, compute "
                          f"buffers), more than --models-memory {limit:.0f} MiB")
            self._emit(inst)
            raise ApiError(503, "unavailable_error", inst.error)
        fits = not limit or sum(i.spec.memory_mib for i in running) + need <= limit
        if fits and (self.models_max == 0 or len(running) < self.models_max):
            self._queue.remove(name)
            self._start(inst)
            return True
        if not any(i.stopping for i in running):
            idle = [i for i in running if i.status in (LOADED, SLEEPING) and i.users == 0]
            if idle:
                victim = min(idle, key=lambda i: i.last_used)
                log.info("unloading %s (least recently used) to load %s%s", victim.spec.name, name,
                         "" if fits else f" within --models-memory {limit:.0f} MiB")
                self._stop(victim)
        return False

    # -- starting and stopping children -----------------------------------------------------------

    def _start(self, inst: Instance) -> None:
        inst.status, inst.failed, inst.error, inst.exit_code = LOADING, False, "", 0
        inst.n_loads += 1
        inst.last_used = time.monotonic()
        if not inst.spec.path:  # a preset's hf-repo: nothing is downloaded here
            inst.status, inst.failed = UNLOADED, True
            inst.error = (f"hf-repo = {inst.spec.hf_repo}: not in the Hugging Face cache "
                          f"({hf_cache.cache_dir()}) and downloading models is not supported "
                          f"by this server; give the section 'model = PATH'")
            self._emit(inst)
            return
        try:
            inst.child = Child(inst.spec, self._on_child, cache_file(self.cache_dir, inst.spec))
        except OSError as e:
            inst.status, inst.failed, inst.error = UNLOADED, True, f"cannot start: {e}"
            self._emit(inst)
            return
        inst.args = inst.child.argv
        log.info("loading model %s (pid %d)", inst.spec.name, inst.child.pid)
        self._emit(inst)

    def _stop(self, inst: Instance) -> None:
        """Under the lock: stop its child in the background; its exit marks it unloaded."""
        child = inst.child
        if child is None or inst.stopping:
            return
        inst.stopping = True
        threading.Thread(target=child.stop, args=(inst.spec.stop_timeout,), daemon=True,
                         name=f"stop-{inst.spec.name}").start()

    def _on_child(self, child: Child, word: str, arg) -> None:
        with self._cond:
            inst = self.models[child.spec.name]
            if inst.child is not child:
                return
            if word == "ready":
                inst.status, inst.port, inst.cpus = LOADED, int(arg), ()
                log.info("model %s loaded on port %d", inst.spec.name, inst.port)
            elif word in ("sleeping", "awake") and inst.status in (LOADED, SLEEPING):
                inst.status = SLEEPING if word == "sleeping" else LOADED
            elif word == "exit":
                was, code = inst.status, int(arg)
                inst.failed = not inst.stopping and (code != 0 or was == LOADING)
                inst.exit_code = code
                inst.error = child.reason() if inst.failed else ""
                inst.status, inst.child, inst.port, inst.stopping = UNLOADED, None, 0, False
                if inst.failed:
                    log.error("model %s %s (exit code %d): %s", inst.spec.name,
                              "failed to load" if was == LOADING else "stopped", code, inst.error)
            self.cores.rebalance(self.models.values())
            self._emit(inst)
            self._cond.notify_all()

    def load(self, inst: Instance) -> None:
        """POST /models/load: loading starts in the background (a place freed as for a request)."""
        def run():
            with contextlib.suppress(ApiError, ClientGone), self.hold(inst):
                self.ready(inst, True, 3600.0)
        threading.Thread(target=run, daemon=True, name=f"load-{inst.spec.name}").start()

    def reload(self, specs: dict[str, ModelSpec], timeout: float = 60.0) -> None:
        """GET /models?reload=1, as llama-server's: a running model whose source went or whose
        flags changed is unloaded (waited for), models no longer in the sources go, the others
        take their new settings (a failure forgotten), new ones are added (none loaded)."""
        with self._cond:
            changed = [i for n, i in self.models.items() if i.running and
                       (n not in specs or (specs[n].path, specs[n].args) != (i.spec.path, i.spec.args))]
            for inst in changed:
                self._stop(inst)
            deadline = time.monotonic() + timeout
            while any(i.running for i in changed) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            # a new table, swapped in whole: the HTTP threads read `models` without the lock
            kept = {n: i for n, i in self.models.items() if n not in specs and (i.running or i.users)}
            table = {}
            for name, spec in specs.items():
                inst = table[name] = self.models.get(name) or Instance(spec)
                if not inst.running:
                    inst.spec, inst.failed, inst.exit_code, inst.error = spec, False, 0, ""
            self.models = {**table, **kept}
            self._cond.notify_all()
        self._emit_raw({"model": "*", "event": "models_reload", "data": {}})

    def remove(self, inst: Instance, timeout: float = 60.0) -> None:
        """DELETE /models: a model of the Hugging Face cache is stopped (waited for), its files
        are deleted from the cache and it leaves the list (an SSE `model_remove` follows)."""
        name = inst.spec.name
        with self._cond:
            self._stop(inst)
            deadline = time.monotonic() + timeout
            while inst.running and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            if inst.running:
                raise ApiError(503, "unavailable_error", f"model '{name}' did not stop; retry later")
            if not hf_cache.remove(name):
                log.warning("model %s: no files in the Hugging Face cache to remove", name)
            self.models = {n: i for n, i in self.models.items() if i is not inst}  # swapped whole
            self._cond.notify_all()
        self._emit_raw({"model": name, "event": "model_remove"})

    def unload(self, inst: Instance) -> None:
        with self._cond:
            self._stop(inst)

    def close(self) -> None:
        """Stop every child, each within its stop-timeout, at the same time."""
        with self._cond:
            self.closing = True
            children = [(i.child, i.spec.stop_timeout) for i in self.models.values() if i.child]
            for child, _ in children:  # no prompt cache to keep: nothing will load it again
                child.control("cache-off")
            self._cond.notify_all()
        threads = [threading.Thread(target=c.stop, args=(t,)) for c, t in children]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self._emit_raw({"event": "shutdown"})

    # -- what /models and /models/sse show ------------------------------------------------------

    def status(self, inst: Instance) -> dict:
        st: dict = {"value": inst.status, "args": list(inst.args)}
        if inst.port:
            st["port"] = inst.port  # our addition: where its child listens (127.0.0.1)
        if inst.cpus and inst.child is not None:
            st["cpus"] = self.cores.view(inst)  # ours: the cores it was last given
        if inst.failed:
            st.update(failed=True, exit_code=inst.exit_code, error=inst.error)
        return st

    def _emit(self, inst: Instance) -> None:
        data: dict = {"status": inst.status}
        if inst.status == UNLOADED:
            data["exit_code"] = inst.exit_code
            if inst.failed:
                data["error"] = inst.error
        self._emit_raw({"model": inst.spec.name, "event": "status_change", "data": data})

    def _emit_raw(self, event: dict) -> None:
        for q in list(self._subscribers):
            q.put(event)

    @contextlib.contextmanager
    def events(self) -> Iterator[queue.SimpleQueue]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._subscribers.append(q)
        try:
            yield q
        finally:
            self._subscribers.remove(q)
