"""The continuous-batching engine: many requests decoded together in one llama_context.

This is llama.cpp's `examples/parallel` serving loop, made reusable. One `Engine` owns one
`Context` with `n_parallel + 1` sequences: sequence 0 holds the shared system prompt, slot i
decodes in sequence i + 1 (with a unified KV cache, holder sequences after those keep idle
prefixes, holders.py). `step()` runs one iteration of the loop, in timed phases:

1. prepare: the warm-up, a new shared system prompt, other threads' calls; cancelled requests
   go (their slots and KV cells are freed at once);
2. batch: each generating slot's last sampled token goes in the batch;
3. admit: waiting requests into free slots (all free slots with continuous batching, only when
   nothing is generating without it); the prompt cache (prompt_cache.py) picks the slot and
   the longest cached prefix, or a live prefill to wait for (prefix_share.py); slots whose
   leader has decoded that prefix start; then prompt pieces go in the batch, the step's
   prompt budget to the prompts nearest their first token (prefill_order.py);
4. decode and sample (decode.py): chunks of n_batch, halving on a full KV cache; every slot
   whose logits a chunk holds samples, stop rules apply, text streams; a finished slot keeps
   its tokens as a cache (a cancelled or failed one goes back to the system prompt);
5. embed: the embedding lanes (embedding.py).

A phase works on the engine's parts (parts.py: context, batch, slots, cache, stats) and returns what
happened (requests that ended, slots ready to start); `step()` applies that to what only the engine
holds: its lock, its waiting queue, its set of unfinished requests. `submit()` may be called from
any thread. `start()` runs `step()` on a background thread that sleeps on a condition variable
while there is nothing to do. Only that thread touches the llama_context.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..batch import Batch
from ..context import Context
from ..model import Model
from .callbacks import CallbackRunner, OnChunk, OnDone
from .calls import CallQueue
from .decode import decode_and_sample
from .embedding import Embedder, EmbeddingRequest
from .outbox import Outbox
from .parts import StepParts
from .preempt import Scheduler
from .prefill_order import PrefillOrder, step_overhead
from .prefix_share import pause_leaders, ready_followers
from .prompt_cache import PromptCache
from .lifecycle import end_waiting, release, start_request, start_requests
from .request import Request
from .slot import WAIT, Slot, batch_generated, batch_prompts
from .slot_files import SlotFiles
from .speculative import make_speculator
from .system_prompt import SystemPrompt, decode_system_prompt, prompt_tokens, starts_with_bos, warmup
from .waiting import WaitingQueue
from .types import EngineClosed, EngineConfig, EngineStats, FinishReason, PromptTooLong, RequestParams
from .views import EngineViews

log = logging.getLogger("llama_lib.engine")


class Engine(EngineViews):
    """Continuous batching over one llama_context. See the module docstring."""

    def __init__(self, model: Model, config: EngineConfig | None = None):
        self.model = model
        self.vocab = model.vocab
        self.config = cfg = config or EngineConfig()
        if cfg.n_parallel < 1:
            raise ValueError("n_parallel must be at least 1")
        self.ctx = Context(model, cfg.context_params())
        self.memory = self.ctx.memory
        self.n_ctx = self.ctx.n_ctx
        # Without a unified cache every sequence has its own n_ctx / n_seq_max cells.
        self.n_ctx_slot = self.ctx.n_ctx_seq
        self.n_batch = self.ctx.n_batch
        self.slots = [Slot(i) for i in range(cfg.n_parallel)]
        self.slot_id_base = 0  # added to the slot id a Request reports (an EnginePool numbers its slots)
        self.system = SystemPrompt(cfg.system_prompt, cfg.share_system_prompt)
        self.cache = PromptCache(
            self.memory, self.slots, self.system, similarity=cfg.slot_prompt_similarity,
            n_swa=0 if cfg.swa_full else model.n_swa, kv_unified=cfg.kv_unified,
            share_prefixes=cfg.prefix_share, n_holders=cfg.n_holders,
            state=self.ctx, ram_limit_bytes=(1 << 62) if cfg.cache_ram_mib < 0 else cfg.cache_ram_mib << 20)
        self.files = SlotFiles(self.ctx, self.cache.seqs, self.n_ctx_slot, self.vocab.n_tokens)
        # Big enough for every slot's prompt at once, as llama.cpp's parallel example does.
        self.batch = Batch(max(self.n_ctx, self.n_batch) + cfg.n_parallel, 1)
        self._waiting = WaitingQueue(cfg.schedule, cfg.max_queue_per_user)  # guarded by _lock
        self._lock = threading.Lock()
        try:  # the embedding lanes' own context, on this context's thread pool
            self.embedder = Embedder.for_engine(model, cfg, self.ctx, self.n_ctx_slot, self._lock)
        except Exception:
            self.ctx.close()
            raise
        self.stats = EngineStats(_ctx=self.ctx, _embedder=self.embedder, _cache=self.cache)
        self.spec = make_speculator(model, cfg, self.ctx)  # speculative decoding (None: off)
        self.prefill = PrefillOrder()  # which prompts a step's budget goes to (prefill_order.py)
        self.parts = StepParts(self.ctx, self.memory, self.batch, self.slots, self.cache, self.vocab,
                               self.stats, cfg, self.n_ctx_slot, self.n_batch, self.spec)
        self._cond = threading.Condition(self._lock)
        self.sched = Scheduler(self.parts, self._waiting, self._lock, cfg.preempt_after_ms)
        self._next_id = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pending_system: str | None = cfg.system_prompt if cfg.share_system_prompt else None
        self._all: set[Request] = set()  # unfinished requests, for shutdown
        # Work for the engine thread from other threads (state reads such as seq_pos_max).
        self._calls = CallQueue()
        self._outbox = Outbox()
        self._callbacks: CallbackRunner | None = None  # started by the first submit with callbacks
        # The warm-up and the first system prompt are decoded by the first step(), on the thread
        # that runs the loop: with an OpenMP libllama every thread that decodes gets an OpenMP
        # team of its own, and a second team (say, the constructor's thread) competes with the
        # engine's for the cores (measured: 60 ms a token instead of 44).
        self._warmup_pending = cfg.warmup
        self._ready = threading.Event()
        if self._pending_system is None and cfg.system_prompt:
            self.system.tokens = self.vocab.tokenize(cfg.system_prompt, add_special=True)

    @property
    def system_prompt(self) -> str:
        """The system prompt's text (requests admitted from now on continue it)."""
        return self.system.text

    @property
    def system_tokens(self) -> np.ndarray:
        """The system prompt's tokens (in sequence 0 when shared, else put before each prompt)."""
        return self.system.tokens

    # -- public API (any thread) -----------------------------------------------------------

    def tokenize_prompt(self, prompt: str | Sequence[int] | np.ndarray, params: RequestParams) -> np.ndarray:
        """The tokens a request will decode after whatever prefix its slot holds."""
        return prompt_tokens(self.vocab, prompt, params, self.system)

    def adds_bos(self, params: RequestParams | None = None) -> bool:
        """Whether a text prompt's tokens begin with BOS (system_prompt.starts_with_bos): only
        where the prompt starts its sequence, not after the system prompt."""
        return starts_with_bos(self.vocab, self.system.text, params)

    def submit(self, prompt: str | Sequence[int] | np.ndarray, params: RequestParams | None = None, *,
               on_chunk: OnChunk | None = None, on_done: OnDone | None = None) -> Request:
        """Queue a request; returns its handle at once. Thread-safe.

        `on_chunk(chunk)` for each Chunk and `on_done(request)` once at the end are called on a
        callback thread (callbacks.py), never the engine's. Raises PromptTooLong, QueueFull,
        EngineClosed, or ValueError for bad parameters (and then calls neither).
        """
        params = params or RequestParams()
        params.sampling.validate(self.vocab.n_tokens, self.vocab)  # parses a grammar too
        if params.slot is not None and not 0 <= params.slot < len(self.slots):
            raise ValueError(f"slot must be in 0..{len(self.slots) - 1}")
        tokens = self.tokenize_prompt(prompt, params)
        if len(tokens) == 0:
            raise ValueError("the prompt is empty")
        prefix = self.system.wanted(params)
        if prefix + len(tokens) >= self.n_ctx_slot:
            raise PromptTooLong(prefix + len(tokens), self.n_ctx_slot)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            self._waiting.check_room(params, self.config.max_queue, all(s.busy for s in self.slots))
            req = Request(self._next_id, tokens, params)
            self._next_id += 1
            req._wake_engine = self._wake
            req._outbox = self._outbox
            if on_chunk is not None or on_done is not None:
                if self._callbacks is None:
                    self._callbacks = CallbackRunner(self.config.callback_threads)
                self._callbacks.attach(req, on_chunk, on_done)
            self._waiting.append(req)
            self._all.add(req)
            self._cond.notify()
        return req

    def submit_embedding(self, inputs: str | Sequence, normalize: int | None = None) -> EmbeddingRequest:
        """Queue inputs to embed (a string, a token-id list, or a list of those); returns a
        handle at once. Thread-safe. Needs EngineConfig(embeddings=True).

        Raises ValueError (empty or too long input, bad token ids), QueueFull, EngineClosed."""
        if self.embedder is None:
            raise RuntimeError("this engine computes no embeddings: EngineConfig(embeddings=True)")
        req = self.embedder.make_request(inputs, self.config.embd_normalize if normalize is None else normalize)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            self.embedder.enqueue(req, self.config.max_queue)
            req._wake_engine = self._wake
            self._cond.notify()
        return req

    def embed(self, inputs: str | Sequence, normalize: int | None = None,
              timeout: float | None = None) -> np.ndarray | list[np.ndarray]:
        """Embed and wait: one input (a string or a token-id list) gives its vector, a list of
        inputs a 2-D array with rows in input order (pooling none: per-token arrays)."""
        return self.submit_embedding(inputs, normalize).vectors_for(inputs, timeout)

    def set_system_prompt(self, text: str) -> None:
        """Replace the shared system prompt for requests admitted from now on.

        Requests in flight keep the prefix they started with: their sequences hold their own
        copy, so nothing waits and nothing they generate changes.
        """
        with self._cond:
            self.system.text = text
            if self.system.shared:
                self._pending_system = text
            else:
                self.system.tokens = self.vocab.tokenize(text, add_special=True) if text else np.zeros(0, np.int32)
            self._cond.notify()

    def start(self, name: str = "llama-engine") -> "Engine":
        """Run step() on a background thread (called `name`) until close(). Returns once that
        thread has done the warm-up and decoded the system prompt, so the first request pays
        for neither."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()
            self._ready.wait()
        return self

    def close(self, cancel: bool = True) -> None:
        """Stop taking requests, cancel (or with cancel=False finish) those in flight, free all."""
        with self._cond:
            self._closed = True
            self._warmup_pending = False  # nothing will be served: no need to warm up
            if cancel:
                for r in list(self._all):
                    r._cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            while self.has_work():
                self.step()
        for r in list(self._all):
            r._finish(FinishReason.CANCELLED)
        self._calls.fail(EngineClosed("the engine is shutting down"))
        if self._callbacks is not None:  # every request has ended: deliver their last callbacks
            self._callbacks.close()
        if self.embedder is not None:
            self.embedder.close()
        self.batch.close()
        for s in self.slots:
            if s.sampler is not None:
                s.sampler.close()
        if self.spec is not None:
            self.spec.close()
        self.ctx.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_running(self) -> bool:
        """Whether step() runs on the engine's own thread (start() was called, close() not)."""
        return self._thread is not None

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest KV position of a sequence (read by the engine thread between steps)."""
        return self.call(lambda: self.memory.seq_pos_max(seq_id))

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` where the context may be touched: on the engine thread between two steps
        once start() was called, else right here. Returns what it returns (or raises)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            fut = self._calls.put(fn)
            self._cond.notify()
        return fut.result(timeout)

    # -- the loop --------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def has_work(self) -> bool:
        """Whether a step would do anything: requests waiting or running, a system prompt or
        the warm-up to decode, calls from other threads, embeddings."""
        return (bool(self._waiting) or any(s.busy for s in self.slots) or self._pending_system is not None
                or self._warmup_pending or bool(self._calls)
                or (self.embedder is not None and self.embedder.has_work()))

    def _run(self) -> None:
        try:
            self._prepare()
        except Exception:
            log.exception("engine warm-up failed")
        finally:
            self._ready.set()
        while True:
            with self._cond:
                while not self.has_work() and not self._closed:
                    self._cond.wait()
                if self._closed and not self.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # a bug or a llama.cpp failure: fail what runs, keep serving
                log.exception("engine step failed")
                for s in self.slots:
                    if s.req is not None:
                        self._release(s, FinishReason.ERROR, f"internal error: {e}")
                with self._lock:  # requests the failed phase ended before it raised
                    self._all = {r for r in self._all if not r.done}

    def run_until_idle(self) -> None:
        """Step until no request is waiting or running (for callers without start())."""
        while self.has_work():
            self.step()

    def step(self) -> bool:
        """One iteration of the serving loop. Returns False when there was nothing to do.

        Its phases are timed into stats (t_prepare, t_batch, t_admit, t_decode_sample)."""
        st = self.stats
        t_start = time.perf_counter()
        with self._outbox.step():  # the step's output reaches its readers at the end
            solo = self._prepare() and self.config.cont_batching
            t_prepared = time.perf_counter()
            self.batch.clear()
            if not solo:  # after a preemption the new prompt decodes alone (Scheduler.preempt)
                batch_generated(self.slots, self.batch)
                if self.spec is not None:  # drafts after the generated tokens (speculative.py)
                    self.spec.add_drafts(self.parts)
            t_generated = time.perf_counter()
            if self._waiting and (self.config.cont_batching or not any(s.busy for s in self.slots)):
                self._admit()
            if any(s.phase is WAIT or s.hold_at for s in self.slots):
                for f, r in ready_followers(self.slots):
                    start_request(self.parts, f, r, self.slot_id_base)
                pause_leaders(self.slots)
            t_admitted = time.perf_counter()
            n_rows = self.batch.n_tokens
            overhead = step_overhead(n_rows, sum(s.generating for s in self.slots))
            n_prompt = batch_prompts(self.prefill.pieces(self.slots, self.config.prefill_chunk, overhead), self.batch)
            st.n_prompt_tokens += n_prompt
            t_batched = time.perf_counter()
            st.t_prepare += t_prepared - t_start
            st.t_admit += t_admitted - t_generated
            st.t_batch += (t_generated - t_prepared) + (t_batched - t_admitted)
            did = self.batch.n_tokens > 0
            if did:
                self._forget(decode_and_sample(self.parts))
            t_done = time.perf_counter()
            st.t_decode_sample += t_done - t_batched
            self.prefill.observe(n_prompt, n_rows + n_prompt, t_done - t_batched)
            if self.embedder is not None and self.embedder.has_work():  # the embed phase
                did = self.embedder.step() or did
        if did:
            st.n_steps += 1
        st.t_step += time.perf_counter() - t_start
        return did

    # -- the phases of a step ---------------------------------------------------------------

    def _prepare(self) -> bool:
        """The warm-up (once), a new shared system prompt into sequence 0, the calls other
        threads asked for; cancelled requests go. True when a running request was just parked
        for a waiting one: this step then decodes only the prompts it admits, so the waiter's
        first token is one short step away instead of behind every other stream's token (the
        others lose that one step; preemptions are rare by design)."""
        if self._warmup_pending:
            self._warmup_pending = False
            warmup(self.ctx, self.batch, self.vocab)
            if self.embedder is not None:
                self.embedder.warmup()
        if self._pending_system is not None:
            self._apply_system_prompt()
        self._calls.run()
        self._drop_cancelled()
        # a waiting request may take a running one's slot (preempt.py)
        return bool(self._waiting) and self.sched.preempt()

    def _apply_system_prompt(self) -> None:
        """Decode the pending system prompt into sequence 0 (idle slots pick it up now)."""
        with self._lock:
            text, self._pending_system = self._pending_system, None
        if text is None:
            return
        tokens = decode_system_prompt(self.ctx, self.batch, self.vocab, text, self.n_ctx_slot)
        self.stats.n_prompt_tokens += len(tokens)
        self.stats.n_system_prompt_tokens = len(tokens)
        self.cache.set_system_tokens(tokens)

    def _admit(self) -> None:
        """Start waiting requests in free slots, in the queue's order (waiting.py). The requests and
        their slots are taken under the lock; samplers (a grammar is parsed) and KV edits are
        made outside it, so submit() never waits for them."""
        free = [s for s in self.slots if s.req is None]
        if not free:
            return
        with self._lock:
            chosen = self._waiting.take(free, self.slots, self.cache.choose)
        chosen = self.sched.resume(chosen, self.slot_id_base)  # parked requests go on
        self._forget(start_requests(self.parts, chosen, self.slot_id_base))

    def _release(self, s: Slot, reason: FinishReason, error: str | None = None) -> None:
        """Finish the slot's request (release.py) and forget it."""
        r = release(s, reason, error, self.cache, self.stats)
        if r is not None:
            self._forget([r])

    def _forget(self, ended: list[Request]) -> None:
        """Requests that ended are no longer the engine's to cancel at close()."""
        if ended:
            with self._lock:
                self._all.difference_update(ended)

    def _drop_cancelled(self) -> None:
        if self._waiting:
            with self._lock:
                gone = self._waiting.pop_cancelled()
            for r in gone:
                self._all.discard(r)
                end_waiting(r, self.stats)
        for s in self.slots:
            if s.req is not None and s.req._cancel.is_set():
                self._release(s, *s.req.cancel_reason)
