"""Several contexts over one model: an `EnginePool` of K engines and the dispatcher in front.

Each engine is an `Engine`: its own llama_context, KV cache, ggml thread pool (optionally on a
CPU set of its own, `ContextParams.cpumask`) and, once started, its own thread; only that
thread touches its context. The engines share one `Model`, so the weights are loaded once and
each engine adds only a context (KV cache, compute buffers, output buffer).

`submit()` takes the same arguments as `Engine.submit` and picks an engine:

1. a request for a given slot goes to the engine that owns it (slot ids run across the pool:
   engine i's slots are numbered from the sum of the slot counts before it);
2. else, with prompt caching on, the engine whose idle slots hold the longest cached prefix of
   the prompt (read from the slots' token arrays in Python, never from a context; with prefix
   sharing, its running and queued requests' prompts count as well), if that
   prefix is more than the engine's slot_prompt_similarity of the prompt and at least
   `min_prefix` tokens, and the engine has a slot free beyond the requests already waiting;
3. else the least loaded engine: (busy slots + waiting requests) per slot, lowest index first.

Without `start()`, `step()` steps every engine once on the calling thread (round robin); with
`start()` each engine runs on its own thread, and their decodes run at the same time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable, Sequence

import numpy as np

from ..cpuset import available, split_cpus
from ..model import Model
from .callbacks import OnChunk, OnDone
from .core import Engine
from .embedding import EmbeddingRequest
from .prompt_cache import common_prefix
from .request import Request
from .types import EngineConfig, RequestParams

log = logging.getLogger("llama_lib.engine")

# The shortest cached prefix worth sending a request to a busier engine for. The similarity
# fraction alone would count a shared BOS and "User:" (3 tokens of a 12-token prompt is 0.25):
# prefilling 16 tokens costs about one decode step here (200-370 prompt tokens/s), less than
# what a step with one more sequence costs the engine that would take the request.
MIN_PREFIX = 16
# EngineStats fields that are one value for the pool, not a sum over its engines
_NOT_SUMMED = {"n_system_prompt_tokens": max}


def split_sizes(total: int, n: int) -> list[int]:
    """`total` split into n parts as even as they come, the larger ones first."""
    q, r = divmod(total, n)
    return [q + (i < r) for i in range(n)]


def split_config(config: EngineConfig, n_engines: int) -> list[EngineConfig]:
    """The engines' configs for a pool that `config` describes as a whole.

    - n_parallel: slots in all, split as evenly as it goes (each engine needs one);
    - n_ctx: KV cells in all. Each slot gets what one engine with these settings gives it
      (n_ctx / (n_parallel + 1) cells), and every engine adds a sequence 0 of that size for its
      copy of the shared system prompt; with kv_unified the cells are split by slots. 0 (the
      model's training context) is passed on, so every engine gets that much;
    - cpumask / cpumask_batch: split into contiguous shares, one per engine (split_cpus);
    - embeddings: computed by the first engine only (one embedding context, not one per engine);
    - n_threads, n_threads_batch and the rest: per engine, as given.
    """
    if n_engines < 1:
        raise ValueError("n_engines must be at least 1")
    if config.n_parallel < n_engines:
        raise ValueError(f"{n_engines} engines need at least {n_engines} slots in all "
                         f"(n_parallel is {config.n_parallel})")
    slots = split_sizes(config.n_parallel, n_engines)
    cpus, _, cpus_b, _ = config.context.cpu_sets()
    # the CPUs this process may use are split, so no engine gets a share it cannot run on
    shares = split_cpus(available(cpus, "CPU set") if cpus else (), n_engines)
    shares_b = (split_cpus(available(cpus_b, "batch CPU set") if cpus_b else (), n_engines)
                if config.cpumask_batch is not None else [None] * n_engines)
    out = []
    for i, np_i in enumerate(slots):
        if not config.n_ctx:
            n_ctx = 0
        elif config.kv_unified:
            n_ctx = max(64, config.n_ctx * np_i // config.n_parallel)
        else:
            n_ctx = config.n_ctx // (config.n_parallel + 1) * (np_i + 1)
        out.append(dataclasses.replace(
            config, n_parallel=np_i, n_ctx=n_ctx, cpumask=shares[i], cpumask_batch=shares_b[i],
            embeddings=config.embeddings and i == 0))
    return out


class PoolStats:
    """The engines' EngineStats added up (read-only); `per_engine` has each one."""

    def __init__(self, engines: Sequence[Engine]):
        self._engines = engines

    @property
    def per_engine(self) -> list:
        return [e.stats for e in self._engines]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        values = [getattr(e.stats, name) for e in self._engines]
        return _NOT_SUMMED.get(name, sum)(values)


class EnginePool:
    """K engines over one Model behind Engine's API; see the module docstring."""

    def __init__(self, model: Model, configs: Sequence[EngineConfig], *, min_prefix: int = MIN_PREFIX):
        if not configs:
            raise ValueError("an EnginePool needs at least one engine config")
        self.model = model
        self.vocab = model.vocab
        self.engines: list[Engine] = []
        try:
            for cfg in configs:
                self.engines.append(Engine(model, cfg))
        except Exception:
            for e in self.engines:
                e.close()
            raise
        base = 0
        for e in self.engines:
            e.slot_id_base = base
            base += len(e.slots)
        self.n_slots = base
        # the pool as a whole: all slots, all cells (what Engine.config says of one engine)
        self.config = dataclasses.replace(configs[0], n_parallel=base,
                                          n_ctx=sum(e.n_ctx for e in self.engines))
        self.n_ctx = sum(e.n_ctx for e in self.engines)
        self.n_ctx_slot = min(e.n_ctx_slot for e in self.engines)
        self.stats = PoolStats(self.engines)
        self.min_prefix = min_prefix
        _warn_oversubscribed(self.engines)
        self._lock = threading.Lock()
        self._pending = [0] * len(self.engines)  # submits chosen but not yet queued, per engine
        self.n_dispatched_cache = 0  # requests sent where a slot held their prefix
        self.n_dispatched_load = 0   # requests sent to the least loaded engine

    @classmethod
    def split(cls, model: Model, config: EngineConfig, n_engines: int, **kw) -> "EnginePool":
        """A pool of n_engines engines sharing what `config` describes (split_config)."""
        return cls(model, split_config(config, n_engines), **kw)

    # -- what the server reads --------------------------------------------------------------

    @property
    def system_prompt(self) -> str:
        return self.engines[0].system_prompt

    @property
    def system_tokens(self) -> np.ndarray:
        return self.engines[0].system_tokens

    def adds_bos(self, params: RequestParams | None = None) -> bool:
        """Whether a text prompt's tokens begin with BOS (Engine.adds_bos)."""
        return self.engines[0].adds_bos(params)

    @property
    def embedder(self):
        """The engine's Embedder that computes the pool's embeddings (None: not configured)."""
        e = self._embedding_engine()
        return e.embedder if e is not None else None

    @property
    def n_waiting(self) -> int:
        return sum(e.n_waiting for e in self.engines)

    @property
    def n_busy(self) -> int:
        return sum(e.n_busy for e in self.engines)

    def engine_of(self, slot_id: int) -> int:
        """Index of the engine that owns a pool slot id."""
        for i, e in enumerate(self.engines):
            if e.slot_id_base <= slot_id < e.slot_id_base + len(e.slots):
                return i
        raise ValueError(f"slot must be in 0..{self.n_slots - 1}")

    def save_slot(self, slot_id: int, path: str):
        i = self.engine_of(slot_id)
        return self.engines[i].save_slot(slot_id - self.engines[i].slot_id_base, path)

    def restore_slot(self, slot_id: int, path: str):
        i = self.engine_of(slot_id)
        return self.engines[i].restore_slot(slot_id - self.engines[i].slot_id_base, path)

    def erase_slot(self, slot_id: int) -> int:
        i = self.engine_of(slot_id)
        return self.engines[i].erase_slot(slot_id - self.engines[i].slot_id_base)

    def ram_cache_stats(self) -> dict[str, int]:
        """The engines' RAM tiers summed (each has its own --cache-ram budget)."""
        return self._summed(Engine.ram_cache_stats)

    def share_stats(self) -> dict[str, int]:
        """The engines' prefix sharing summed (a prefix is shared within one engine's KV)."""
        return self._summed(Engine.share_stats)

    def _summed(self, read: Callable[[Engine], dict[str, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.engines:
            for k, v in read(e).items():
                out[k] = out.get(k, 0) + v
        return out

    def users_info(self) -> list[dict]:
        """Every engine's per-user counters, with an `engine` field (each queues its own)."""
        return [dict(u, engine=i) for i, e in enumerate(self.engines) for u in e.users_info()]

    def slots_info(self) -> list[dict]:
        """Every engine's slots with pool-wide ids and an `engine` field (its engine's index)."""
        return [dict(info, id=info["id"] + e.slot_id_base, engine=i)
                for i, e in enumerate(self.engines) for info in e.slots_info()]

    # -- requests (any thread) --------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int] | np.ndarray, params: RequestParams | None = None, *,
               on_chunk: OnChunk | None = None, on_done: OnDone | None = None) -> Request:
        """Queue a request on the engine the dispatcher picks; returns its handle at once.
        Thread-safe. Callbacks and raised errors as Engine.submit."""
        params = params or RequestParams()
        callbacks = dict(on_chunk=on_chunk, on_done=on_done)
        if params.slot is not None:
            i = self.engine_of(params.slot)
            local = dataclasses.replace(params, slot=params.slot - self.engines[i].slot_id_base)
            return self.engines[i].submit(prompt, local, **callbacks)
        first = self.engines[0]
        tokens = first.tokenize_prompt(prompt, params)
        with self._lock:
            i = self._choose(tokens, params)
            self._pending[i] += 1
        try:
            # The tokens go on as they are, unless the engine would put an unshared system
            # prompt in front of them again.
            unshared = params.use_system_prompt and not first.system.shared and len(first.system_tokens)
            return self.engines[i].submit(prompt if unshared else tokens, params, **callbacks)
        finally:
            with self._lock:
                self._pending[i] -= 1

    def _choose(self, tokens: np.ndarray, params: RequestParams) -> int:
        """The engine for a request (call with the lock): see the module docstring."""
        loads = [e.n_busy + e.n_waiting + self._pending[i] for i, e in enumerate(self.engines)]
        if params.cache_prompt and len(tokens):
            best, best_n = None, 0
            for i, e in enumerate(self.engines):
                thold = e.config.slot_prompt_similarity
                if thold <= 0 or loads[i] >= len(e.slots):
                    continue
                n = _cached_prefix(e, tokens, params)
                if n > best_n and n >= self.min_prefix and n / len(tokens) > thold:
                    best, best_n = i, n
            if best is not None:
                self.n_dispatched_cache += 1
                log.debug("request to engine %d: a slot holds %d of its %d tokens", best, best_n, len(tokens))
                return best
        self.n_dispatched_load += 1
        return min(range(len(self.engines)), key=lambda i: (loads[i] / len(self.engines[i].slots), i))

    def _embedding_engine(self) -> Engine | None:
        return next((e for e in self.engines if e.embedder is not None), None)

    def submit_embedding(self, inputs: str | Sequence, normalize: int | None = None) -> EmbeddingRequest:
        """Queue inputs to embed on the engine that computes embeddings (see Engine)."""
        e = self._embedding_engine()
        if e is None:
            raise RuntimeError("this pool computes no embeddings: EngineConfig(embeddings=True)")
        return e.submit_embedding(inputs, normalize)

    def embed(self, inputs: str | Sequence, normalize: int | None = None,
              timeout: float | None = None) -> np.ndarray | list[np.ndarray]:
        """Embed and wait (Engine.embed) on the engine that computes embeddings."""
        return self.submit_embedding(inputs, normalize).vectors_for(inputs, timeout)

    def set_system_prompt(self, text: str) -> None:
        """Replace the shared system prompt on every engine (each decodes its own copy)."""
        for e in self.engines:
            e.set_system_prompt(text)

    # -- running ----------------------------------------------------------------------------

    def start(self) -> "EnginePool":
        """Start every engine's thread (each returns once warmed up, as Engine.start)."""
        for i, e in enumerate(self.engines):
            e.start(name=f"llama-engine-{i}")
        return self

    def step(self) -> bool:
        """Step every engine once on this thread (for callers without start()); False when
        none had anything to do."""
        did = False
        for e in self.engines:
            did = e.step() or did
        return did

    def run_until_idle(self) -> None:
        while any(e.has_work() for e in self.engines):
            self.step()

    def close(self, cancel: bool = True) -> None:
        """Close every engine (Engine.close); the model stays the caller's."""
        for e in self.engines:
            e.close(cancel)

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _warn_oversubscribed(engines: Sequence[Engine]) -> None:
    """Pool threads poll (busy-wait) for work after each graph: with more threads than CPUs in
    all, an engine's polling threads take the CPUs another engine is computing on (seen here: two
    2-thread contexts on 2 cores, 52 ms a step instead of 25 with poll 0)."""
    n_cpus = len(os.sched_getaffinity(0))
    polling = [e for e in engines if e.ctx.threadpool_attached and e.ctx.params.poll > 0]
    n_threads = sum(max(e.ctx.params.n_threads, e.ctx.params.n_threads_batch) for e in polling)
    if len(polling) > 1 and n_threads > n_cpus:
        log.warning("%d engines run %d polling pool threads on %d CPUs: they will spin on each "
                    "other's CPUs; give each engine fewer threads (-t) or poll 0 (--poll 0)",
                    len(polling), n_threads, n_cpus)


def _cached_prefix(e: Engine, tokens: np.ndarray, params: RequestParams) -> int:
    """The most prompt tokens an idle slot of the engine holds as a prefix, after the system
    prompt the request continues (the slots' arrays, read without the engine's thread). With
    prefix sharing, the prompts of its running and queued requests count too: the request will
    copy or wait for what they decode (prefix_share.py), so requests sent together stay together;
    so do the prefixes its holder sequences keep (a snapshot of their list: the engine thread
    edits the holders' tree)."""
    want_prefix = e.system.wanted(params)
    best = 0
    others: list[np.ndarray] = []
    for s in e.slots:
        cached, live = s.cache_tokens, s.req
        if live is None and len(cached) and s.n_prefix == want_prefix:
            best = max(best, common_prefix(cached, tokens))
        elif live is not None:
            others.append(live.prompt_tokens)
    if e.config.prefix_share:
        others += e.waiting_prompts()
        best = max([best] + [common_prefix(p, tokens) for p in others])
    return max([best] + [common_prefix(held, tokens) for held in e.cache.held_prefixes(want_prefix)])
