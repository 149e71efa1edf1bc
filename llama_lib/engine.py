"""The continuous-batching engine: many requests decoded together in one llama_context.

This is llama.cpp's `examples/parallel` serving loop, made reusable. One `Engine` owns one
`Context` with `n_parallel + 1` sequences: sequence 0 holds the shared system prompt, slot i
decodes in sequence i + 1. `step()` runs one iteration of the loop:

1. drop cancelled requests (their slots and KV cells are freed at once);
2. put each generating slot's last sampled token in the batch;
3. admit waiting requests into free slots (all free slots with continuous batching, only when
   nothing is generating without it): the free slot whose cached tokens share the longest prefix
   with the prompt (llama-server's prompt cache), else the lowest free one; only the
   part of the prompt past what the slot's KV already holds is written, in one vectorised call;
4. decode in chunks of n_batch, halving a chunk and retrying when the KV cache has no room;
5. sample every slot whose logits are in a decoded chunk, apply stop rules, stream the text;
6. release finished slots: their sequence keeps the request's prompt and generated tokens as a
   cache for the next request (a cancelled or failed request's go back to the system prompt).

`submit()` may be called from any thread. `start()` runs `step()` on a background thread that
sleeps on a condition variable while there is nothing to do. Only that thread touches the
llama_context.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import enum
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .batch import Batch
from .context import DECODE_NO_KV_SLOT, Context, ContextParams
from .model import Model
from .sampler import Sampler, SamplingParams

log = logging.getLogger("llama_lib.engine")


class FinishReason(str, enum.Enum):
    EOS = "eos"              # the model produced an end-of-generation token
    STOP = "stop"            # a stop string (anti-prompt) was generated
    LENGTH = "length"        # n_predict reached, or the slot's context is full
    CANCELLED = "cancelled"  # the caller cancelled (or went away)
    ERROR = "error"          # the request could not be served (see `error`)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit."""


class PromptTooLong(ValueError):
    """The prompt does not fit in one slot's context."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int):
        super().__init__(
            f"the request exceeds the available context size: the prompt has {n_prompt_tokens} "
            f"tokens but a slot holds {n_ctx}"
        )
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class EngineConfig:
    """How the engine sizes its context and schedules requests (llama.cpp's names)."""

    n_parallel: int = 4            # slots (simultaneous requests)
    n_ctx: int = 0                 # total KV cells; 0 = the model's training context
    n_batch: int = 2048            # most tokens handed to one llama_decode call
    n_ubatch: int = 512
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 4)
    n_threads_batch: int = field(default_factory=lambda: os.cpu_count() or 4)
    cont_batching: bool = True     # admit new requests while others generate
    kv_unified: bool = False       # one KV buffer shared by all sequences
    swa_full: bool = False
    flash_attn: int = -1           # llama_flash_attn_type: -1 auto, 0 off, 1 on
    type_k: int = 1                # ggml_type of the KV cache's K and V (1 = GGML_TYPE_F16)
    type_v: int = 1
    system_prompt: str = ""        # text every request continues
    share_system_prompt: bool = True  # decode it once into sequence 0 and copy it to slots
    max_queue: int = 256           # requests waiting for a slot before submit() refuses
    # Most prompt tokens to put in one step beside the generating slots, so a long prompt is
    # prefilled in pieces instead of stalling everyone else. 0: the whole prompt at once.
    prefill_chunk: int = 0
    warmup: bool = True            # one throw-away decode at start, as llama.cpp's programs do
    threadpool: bool = True        # a persistent ggml thread pool (see ContextParams)
    poll: int = 50                 # busy-wait level of idle pool threads, 0-100 (llama.cpp --poll)
    prio: int = 0                  # pool thread priority, -1..3 (llama.cpp --prio)
    # llama-server's --slot-prompt-similarity: a free slot whose cached tokens share at least
    # this fraction of a new prompt (as a prefix) is preferred; 0 = always the least recently
    # used free slot (whose cache is still reused as far as it matches).
    slot_prompt_similarity: float = 0.1

    def context_params(self) -> ContextParams:
        return ContextParams(
            n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch,
            n_seq_max=self.n_parallel + 1, n_threads=self.n_threads,
            n_threads_batch=self.n_threads_batch, kv_unified=self.kv_unified,
            swa_full=self.swa_full, flash_attn=self.flash_attn,
            type_k=self.type_k, type_v=self.type_v,
            threadpool=self.threadpool, poll=self.poll, prio=self.prio,
        )


@dataclass
class RequestParams:
    """What one request asks for."""

    n_predict: int = -1            # tokens to generate; -1: until EOS or the slot is full
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()       # stop strings (anti-prompts), never emitted
    ignore_eos: bool = False       # keep going through end-of-generation tokens
    use_system_prompt: bool = True # continue the shared system prompt
    add_bos: bool | None = None    # None: BOS only when the prompt starts a sequence
    min_tokens: int = 0            # stop rules are ignored for the first min_tokens tokens
    slot: int | None = None        # run in this slot (waits for it); None: the free slot
                                   # with the most similar cache, else the lowest free one
    cache_prompt: bool = True      # reuse the prefix the slot's KV cache shares with the prompt
    # llama-server's n_probs: with n > 0 every generated token carries its log-probability and
    # the n most probable tokens (softmax of the raw logits row, before any sampler). 0: none.
    n_probs: int = 0
    tag: object = None             # free for the caller (parallel.py stores the client here)


@dataclass
class TokenProbs:
    """One generated token's probabilities (llama-server's completion_token_output).

    Log-probabilities of the softmax over the whole vocabulary of the raw logits (before
    logit bias, penalties or any sampler), as llama-server without post_sampling_probs."""

    token: int
    text: str                  # the text emitted with this token ("" while held back)
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the n_probs most probable, best first


@dataclass
class Chunk:
    """A piece of streamed output: whole UTF-8 text and the token ids that produced it.

    `probs`: for a request with n_probs > 0, one entry per token of `tokens`; else None."""

    text: str
    tokens: list[int]
    probs: list[TokenProbs] | None = None


def token_probs(logits: np.ndarray, tok: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-softmax of a logits row at `tok` and its `n` largest entries, best first.

    Stable: the row's maximum is subtracted and the sum is taken in float64. The row is read,
    never written (it may be llama.cpp's own buffer)."""
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))
    n = min(n, len(logits))
    top = np.argpartition(logits, len(logits) - n)[len(logits) - n:]
    top = top[np.argsort(-logits[top], kind="stable")]
    vals = logits[top].astype(np.float64) - lse
    return float(logits[tok]) - lse, list(zip(top.tolist(), vals.tolist()))


@dataclass
class Timings:
    """Wall-clock instants (time.perf_counter) of a request's life."""

    submitted: float = 0.0
    started: float = 0.0           # admitted into a slot
    prompt_done: float = 0.0       # first token sampled
    done: float = 0.0

    @property
    def queued_s(self) -> float:
        return max(0.0, self.started - self.submitted)

    @property
    def prompt_s(self) -> float:
        return max(0.0, self.prompt_done - self.started)

    @property
    def first_token_s(self) -> float:
        return max(0.0, self.prompt_done - self.submitted)

    @property
    def total_s(self) -> float:
        return max(0.0, self.done - self.submitted)


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
        self._engine: Engine | None = None

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
        if self._engine is not None:
            self._engine._wake()

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


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class _StopMatcher:
    """Turns token bytes into text to emit, holding back what may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""

    def feed(self, piece: bytes, check: bool) -> tuple[str, str | None]:
        """Add a token's bytes. Returns (text safe to emit, stop string found or None)."""
        new = self.decoder.decode(piece)
        if not self.stops:
            return new, None
        self.pending += new
        # `pending` is short (a held-back partial stop plus one token's text): search all of it.
        found_at, found = -1, None
        for s in self.stops:
            k = self.pending.find(s)
            if k != -1 and (found_at == -1 or k < found_at):
                found_at, found = k, s
        if found is not None:
            if check:
                out, self.pending = self.pending[:found_at], ""
                return out, found
            # Too early to stop: keep the stop string back so that a later check finds it.
            out, self.pending = self.pending[:found_at], self.pending[found_at:]
            return out, None
        hold = self._partial_len()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def _partial_len(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        p = self.pending
        for n in range(min(len(p), self.max_len - 1), 0, -1):
            tail = p[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


class _Slot:
    """One of the n_parallel places a request runs in; uses KV sequence id + 1."""

    __slots__ = ("id", "seq_id", "req", "sampler", "matcher", "n_past", "n_prefix",
                 "prefix_version", "prompt_pos", "i_batch", "sampled", "n_decoded", "t_last",
                 "kv_pos_max", "cache_tokens")

    def __init__(self, sid: int):
        self.id = sid
        self.seq_id = sid + 1
        self.req: Request | None = None
        self.sampler: Sampler | None = None
        self.matcher: _StopMatcher | None = None
        self.n_past = 0          # next position to write in the sequence
        self.n_prefix = 0        # system prompt tokens this sequence holds
        self.prefix_version = 0  # which system prompt those tokens are
        self.prompt_pos = 0      # prompt tokens of the request already in the batch
        self.i_batch = -1        # row of this slot's logits in the current batch, -1 if none
        self.sampled = -1        # last sampled token, decoded in the next step
        self.n_decoded = 0
        self.t_last = 0.0        # when the slot was last released (least recently used first)
        # While idle: the tokens the sequence holds after the system prompt (the last request's
        # prompt and generated tokens), reusable by the next request. Empty while busy.
        self.cache_tokens = np.zeros(0, np.int32)
        self.kv_pos_max = -1     # seq_pos_max of the sequence, read by the engine thread when
                                 # the slot was last released or reset (for monitoring)

    @property
    def busy(self) -> bool:
        return self.req is not None

    @property
    def generating(self) -> bool:
        return self.req is not None and self.sampled >= 0


@dataclass
class EngineStats:
    """Running totals since the engine started."""

    n_prompt_tokens: int = 0       # prompt tokens decoded (system prompt included)
    n_prompt_tokens_cached: int = 0  # prompt tokens found in a slot's cache, not decoded
                                     # (besides the shared system prompt)
    n_generated_tokens: int = 0    # tokens sampled
    n_cache_misses: int = 0        # llama_decode found no KV room and the chunk was halved
    n_steps: int = 0
    n_requests_done: int = 0
    n_requests_failed: int = 0
    n_requests_cancelled: int = 0
    t_sample: float = 0.0          # seconds inside sampling
    t_step: float = 0.0            # seconds inside step() in all
    n_system_prompt_tokens: int = 0
    _ctx: object = field(default=None, repr=False)

    @property
    def t_decode(self) -> float:
        """Seconds inside llama_decode."""
        return self._ctx.t_decode if self._ctx is not None else 0.0

    @property
    def n_decode_calls(self) -> int:
        return self._ctx.n_decode_calls if self._ctx is not None else 0

    @property
    def t_overhead(self) -> float:
        """Seconds in step() spent neither decoding nor sampling: the Python cost."""
        return max(0.0, self.t_step - self.t_decode - self.t_sample)


class Engine:
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
        self.slots = [_Slot(i) for i in range(cfg.n_parallel)]
        # Big enough for every slot's prompt at once, as llama.cpp's parallel example does.
        self.batch = Batch(max(self.n_ctx, self.n_batch) + cfg.n_parallel, 1)
        self.stats = EngineStats(_ctx=self.ctx)
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._next_id = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pending_system: str | None = cfg.system_prompt if cfg.share_system_prompt else None
        self.system_prompt = cfg.system_prompt
        self.system_tokens = np.zeros(0, dtype=np.int32)
        self._system_version = 0
        self._all: set[Request] = set()  # unfinished requests, for shutdown
        if cfg.warmup:
            self._warmup()
        if self._pending_system is not None:
            self._apply_system_prompt()
        elif cfg.system_prompt:
            self.system_tokens = self.vocab.tokenize(cfg.system_prompt, add_special=True)

    # -- public API (any thread) -----------------------------------------------------------

    def tokenize_prompt(self, prompt: str | Sequence[int] | np.ndarray, params: RequestParams) -> np.ndarray:
        """The tokens a request will decode after whatever prefix its slot holds."""
        shared = self.config.share_system_prompt and params.use_system_prompt
        if isinstance(prompt, str):
            starts_sequence = not (params.use_system_prompt and self.system_prompt)
            add_bos = params.add_bos if params.add_bos is not None else (
                starts_sequence and self.vocab.add_bos)
            tokens = self.vocab.tokenize(prompt, add_special=add_bos, parse_special=True)
        else:
            tokens = np.asarray(prompt, dtype=np.int32).reshape(-1)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab.n_tokens):
                raise ValueError(f"prompt token ids must be in 0..{self.vocab.n_tokens - 1}")
        if params.use_system_prompt and not shared and len(self.system_tokens):
            tokens = np.concatenate([self.system_tokens, tokens])
        return tokens

    def submit(self, prompt: str | Sequence[int] | np.ndarray, params: RequestParams | None = None) -> Request:
        """Queue a request; returns its handle at once. Thread-safe.

        Raises PromptTooLong, QueueFull, EngineClosed, or ValueError for bad parameters.
        """
        params = params or RequestParams()
        params.sampling.validate(self.vocab.n_tokens, self.vocab)  # parses a grammar too
        if params.slot is not None and not 0 <= params.slot < len(self.slots):
            raise ValueError(f"slot must be in 0..{len(self.slots) - 1}")
        tokens = self.tokenize_prompt(prompt, params)
        if len(tokens) == 0:
            raise ValueError("the prompt is empty")
        prefix = len(self.system_tokens) if (params.use_system_prompt and self.config.share_system_prompt) else 0
        if prefix + len(tokens) >= self.n_ctx_slot:
            raise PromptTooLong(prefix + len(tokens), self.n_ctx_slot)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if len(self._waiting) >= self.config.max_queue and not self._has_free_slot():
                raise QueueFull(f"all {len(self.slots)} slots are busy and {len(self._waiting)} requests wait")
            req = Request(self._next_id, tokens, params)
            self._next_id += 1
            req._engine = self
            self._waiting.append(req)
            self._all.add(req)
            self._cond.notify()
        return req

    def set_system_prompt(self, text: str) -> None:
        """Replace the shared system prompt for requests admitted from now on.

        Requests in flight keep the prefix they started with: their sequences hold their own
        copy, so nothing waits and nothing they generate changes.
        """
        with self._cond:
            self.system_prompt = text
            if self.config.share_system_prompt:
                self._pending_system = text
            else:
                self.system_tokens = self.vocab.tokenize(text, add_special=True) if text else np.zeros(0, np.int32)
            self._cond.notify()

    def start(self) -> "Engine":
        """Run step() on a background thread until close()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, cancel: bool = True) -> None:
        """Stop taking requests, cancel (or with cancel=False finish) those in flight, free all."""
        with self._cond:
            self._closed = True
            if cancel:
                for r in list(self._all):
                    r._cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            while self._has_work():
                self.step()
        for r in list(self._all):
            r._finish(FinishReason.CANCELLED)
        self.batch.close()
        for s in self.slots:
            if s.sampler is not None:
                s.sampler.close()
        self.ctx.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_busy(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def slots_info(self) -> list[dict]:
        """A snapshot of every slot, for monitoring (read without stopping the engine)."""
        out = []
        for s in self.slots:
            r = s.req
            out.append({
                "id": s.id,
                "seq_id": s.seq_id,
                "n_ctx": self.n_ctx_slot,
                "is_processing": r is not None,
                "id_task": r.id if r is not None else -1,
                "n_past": s.n_past,
                "n_prompt_tokens": r.n_prompt_tokens if r is not None else 0,
                "n_decoded": len(r.tokens) if r is not None else 0,
                "n_system_tokens": s.n_prefix,
                # the sequence's largest KV position when the slot was last released (-1: empty)
                "kv_pos_max": s.kv_pos_max,
            })
        return out

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest KV position of a sequence. Call only while the engine thread is idle."""
        return self.memory.seq_pos_max(seq_id)

    # -- the loop --------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _has_free_slot(self) -> bool:
        return any(s.req is None for s in self.slots)

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(s.busy for s in self.slots) or self._pending_system is not None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._has_work() and not self._closed:
                    self._cond.wait()
                if self._closed and not self._has_work():
                    return
            try:
                self.step()
            except Exception as e:  # a bug or a llama.cpp failure: fail what runs, keep serving
                log.exception("engine step failed")
                for s in self.slots:
                    if s.req is not None:
                        self._release(s, FinishReason.ERROR, f"internal error: {e}")

    def run_until_idle(self) -> None:
        """Step until no request is waiting or running (for callers without start())."""
        while self._has_work():
            self.step()

    def step(self) -> bool:
        """One iteration of the serving loop. Returns False when there was nothing to do."""
        t_step = time.perf_counter()
        st = self.stats
        if self._pending_system is not None:
            self._apply_system_prompt()
        self._drop_cancelled()

        batch = self.batch
        batch.clear()
        # 1. the token each generating slot sampled last step
        gen = [s for s in self.slots if s.generating and s.prompt_pos >= len(s.req.prompt_tokens)]
        if gen:
            start = batch.add_tokens(
                np.fromiter((s.sampled for s in gen), np.int32, len(gen)),
                np.fromiter((s.n_past for s in gen), np.int32, len(gen)),
                np.fromiter((s.seq_id for s in gen), np.int32, len(gen)),
            )
            for k, s in enumerate(gen):
                s.i_batch = start + k
                s.n_past += 1
                s.n_decoded += 1

        # 2. admit waiting requests into free slots
        if self._waiting and (self.config.cont_batching or not any(s.busy for s in self.slots)):
            self._admit()

        # 3. prompt tokens (whole prompts, or pieces of at most prefill_chunk per step)
        budget = self.config.prefill_chunk or (1 << 30)
        for s in self.slots:
            r = s.req
            if r is None or s.prompt_pos >= len(r.prompt_tokens) or budget <= 0:
                continue
            n = min(len(r.prompt_tokens) - s.prompt_pos, budget, batch.capacity - batch.n_tokens)
            if n <= 0:
                continue
            last = s.prompt_pos + n == len(r.prompt_tokens)
            i = batch.add_sequence(r.prompt_tokens[s.prompt_pos:s.prompt_pos + n], s.n_past,
                                   s.seq_id, logits_last=last)
            s.prompt_pos += n
            s.n_past += n
            budget -= n
            st.n_prompt_tokens += n
            s.i_batch = i if last else -1

        if batch.n_tokens == 0:
            st.t_step += time.perf_counter() - t_step
            return False

        self._decode_and_sample()
        st.n_steps += 1
        st.t_step += time.perf_counter() - t_step
        return True

    def _admit(self) -> None:
        """Start waiting requests in free slots, first come first served."""
        with self._lock:
            free = [s for s in self.slots if s.req is None]
            if not free:
                return
            deferred = collections.deque()
            while self._waiting and free:
                r = self._waiting.popleft()
                want = r.params.slot
                if want is None:
                    slot = self._pick_slot(r, free)
                    free.remove(slot)
                    self._start(slot, r)
                elif self.slots[want].req is None:
                    self._start(self.slots[want], r)
                    free.remove(self.slots[want])
                else:
                    deferred.append(r)  # its slot is busy: it keeps its place in the queue
            deferred.extend(self._waiting)
            self._waiting = deferred

    def _want_prefix(self, r: Request) -> int:
        """System prompt tokens the request's sequence must start with."""
        shared = r.params.use_system_prompt and self.config.share_system_prompt
        return len(self.system_tokens) if shared else 0

    def _prefix_fits(self, s: _Slot, want_prefix: int) -> bool:
        """Whether the slot's sequence starts with the system prompt the request continues."""
        return s.n_prefix == want_prefix and (not want_prefix or s.prefix_version == self._system_version)

    def _pick_slot(self, r: Request, free: list[_Slot]) -> _Slot:
        """llama-server's slot choice: the free slot whose cache shares the largest fraction
        of the prompt (above slot_prompt_similarity), else the free slot with the lowest id."""
        thold = self.config.slot_prompt_similarity
        if thold > 0 and r.params.cache_prompt:
            want_prefix = self._want_prefix(r)
            best, best_sim = None, 0.0
            for s in free:
                if not len(s.cache_tokens) or not self._prefix_fits(s, want_prefix):
                    continue
                sim = _common_prefix(s.cache_tokens, r.prompt_tokens) / len(r.prompt_tokens)
                if sim > best_sim and sim > thold:
                    best, best_sim = s, sim
            if best is not None:
                return best
        # Not llama-server's least recently used slot: the lowest free id keeps the decoding
        # sequences contiguous, and llama.cpp splits a batch whose sequences have gaps into
        # several ubatches (seen: 8 streams at -np 9, 52 ms a step contiguous, 80 ms with a gap)
        return min(free, key=lambda s: s.id)

    def _swa_window_kept(self, s: _Slot, n_past: int) -> bool:
        """Whether the slot's KV still holds what a token at position n_past attends to.

        A sliding-window cache that is not full-size (Gemma 3: window 512) overwrites cells
        that fell out of the window, so a sequence may hold only its last positions;
        decoding from n_past needs the window before it (llama-server checks the same with
        llama_memory_seq_pos_min and re-processes the whole prompt otherwise).
        """
        n_swa = 0 if self.config.swa_full else self.model.n_swa
        if n_swa <= 0:
            return True
        pos_min = self.memory.seq_pos_min(s.seq_id)
        return 0 <= pos_min <= max(0, n_past - n_swa)

    def _reuse_cache(self, s: _Slot, r: Request) -> int:
        """Prepare the slot's sequence for the request; returns the prompt tokens it keeps.

        The sequence keeps the longest prefix of its cached tokens that the prompt shares
        (at least the last prompt token is decoded again, for its logits); everything else
        goes, and without a usable prefix it is reset to the system prompt alone.
        """
        want_prefix = self._want_prefix(r)
        cached = s.cache_tokens
        s.cache_tokens = np.zeros(0, np.int32)
        n_keep = 0
        if self._prefix_fits(s, want_prefix) \
                and self.memory.seq_pos_max(s.seq_id) == s.n_prefix + len(cached) - 1:
            if r.params.cache_prompt and len(cached):
                n_keep = min(_common_prefix(cached, r.prompt_tokens), len(r.prompt_tokens) - 1)
                if n_keep > 0 and not self._swa_window_kept(s, s.n_prefix + n_keep):
                    log.info("slot %d: %d cached tokens are past the sliding window; "
                             "the prompt is processed again", s.id, n_keep)
                    n_keep = 0
            if n_keep > 0:
                if not self.memory.seq_rm(s.seq_id, s.n_prefix + n_keep, -1):
                    n_keep = 0
            if n_keep == 0 and len(cached):
                self._reset_sequence(s, with_prefix=bool(want_prefix))
        else:
            self._reset_sequence(s, with_prefix=bool(want_prefix))
        return n_keep

    def _start(self, s: _Slot, r: Request) -> None:
        p = r.params
        n_keep = self._reuse_cache(s, r)
        r.slot_id = s.id
        r.n_cached_tokens = s.n_prefix + n_keep
        r.n_prompt_tokens = len(r.prompt_tokens) - n_keep
        self.stats.n_prompt_tokens_cached += n_keep
        r.timings.started = time.perf_counter()
        s.req = r
        s.n_past = s.n_prefix + n_keep
        s.prompt_pos = n_keep
        s.i_batch = -1
        s.sampled = -1
        s.n_decoded = 0
        if s.sampler is not None:
            s.sampler.close()
        sampling = p.sampling
        if sampling.repeat_last_n == -1:  # llama.cpp's "the whole context"
            sampling = dataclasses.replace(sampling, repeat_last_n=self.n_ctx_slot)
        s.sampler = Sampler(sampling, self.vocab.n_tokens, self.vocab)
        s.matcher = _StopMatcher(p.stop)

    def _reset_sequence(self, s: _Slot, with_prefix: bool) -> None:
        """Empty a slot's sequence, then give it the current system prompt if asked."""
        self.memory.seq_rm(s.seq_id, -1, -1)
        s.n_prefix = 0
        s.cache_tokens = np.zeros(0, np.int32)
        if with_prefix and len(self.system_tokens):
            self.memory.seq_cp(0, s.seq_id, -1, -1)
            s.n_prefix = len(self.system_tokens)
            s.prefix_version = self._system_version
        s.n_past = s.n_prefix
        s.kv_pos_max = self.memory.seq_pos_max(s.seq_id)

    def _warmup(self) -> None:
        """Decode BOS, EOS once and forget them: the first real request then pays no one-time
        costs (weight repacking, graph allocation)."""
        tokens = [t for t in (self.vocab.bos, self.vocab.eos) if t >= 0] or [0]
        self.batch.clear()
        self.batch.add_sequence(np.array(tokens, np.int32), 0, 0)
        self.ctx.decode(self.batch.view())
        self.memory.clear(True)
        self.ctx.t_decode, self.ctx.n_decode_calls = 0.0, 0
        self.batch.clear()

    def _apply_system_prompt(self) -> None:
        """Decode the pending system prompt into sequence 0 (idle slots pick it up on admission)."""
        with self._lock:
            text, self._pending_system = self._pending_system, None
        if text is None:
            return
        tokens = self.vocab.tokenize(text, add_special=True) if text else np.zeros(0, np.int32)
        self.memory.seq_rm(0, -1, -1)
        if len(tokens):
            if len(tokens) >= self.n_ctx_slot:
                log.error("system prompt of %d tokens does not fit a slot of %d; ignored",
                          len(tokens), self.n_ctx_slot)
                tokens = np.zeros(0, np.int32)
            else:
                self.batch.clear()
                self.batch.add_sequence(tokens, 0, 0, logits_last=False)
                for start in range(0, len(tokens), self.n_batch):
                    n = min(self.n_batch, len(tokens) - start)
                    if self.ctx.decode(self.batch.view(start, n)) != 0:
                        raise RuntimeError("no KV room for the system prompt; raise -c/--ctx-size")
                self.stats.n_prompt_tokens += len(tokens)
        self.system_tokens = tokens
        self.stats.n_system_prompt_tokens = len(tokens)
        self._system_version += 1
        for s in self.slots:  # idle slots take the new prefix now; busy ones when they finish
            if s.req is None:
                self._reset_sequence(s, with_prefix=True)

    def _drop_cancelled(self) -> None:
        if self._waiting:
            with self._lock:
                keep = collections.deque(r for r in self._waiting if not r._cancel.is_set())
                gone = [r for r in self._waiting if r._cancel.is_set()]
                self._waiting = keep
            for r in gone:
                self.stats.n_requests_cancelled += 1
                self._all.discard(r)
                r._finish(FinishReason.CANCELLED)
        for s in self.slots:
            if s.req is not None and s.req._cancel.is_set():
                self._release(s, FinishReason.CANCELLED)

    def _decode_and_sample(self) -> None:
        """Decode the batch in chunks of n_batch, halving on a full KV cache; sample as we go."""
        batch, ctx, st = self.batch, self.ctx, self.stats
        n_batch = self.n_batch
        i = 0
        while i < batch.n_tokens:
            n = min(n_batch, batch.n_tokens - i)
            ret = ctx.decode(batch.view(i, n))
            if ret == DECODE_NO_KV_SLOT:
                st.n_cache_misses += 1
                if self._evict_idle_cache():
                    continue
                if n > 1:
                    n_batch = max(1, n // 2)
                    log.warning("no KV room for %d tokens, retrying with n_batch = %d", n, n_batch)
                    continue
                self._fail_token_owner(i)
                continue
            self._sample_range(i, i + n)
            i += n
            n_batch = self.n_batch

    def _keep_cache(self, s: _Slot, r: Request, reason: FinishReason) -> bool:
        """Record the tokens a finished request leaves in its sequence as the slot's cache.

        False (the caller resets the sequence) for a cancelled or failed request, a system
        prompt replaced meanwhile, or a sequence that does not hold exactly those tokens.
        """
        if reason not in (FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH):
            return False
        if s.n_prefix and s.prefix_version != self._system_version:
            return False
        # the last sampled token was never decoded
        cache = np.concatenate([r.prompt_tokens, np.asarray(r.tokens[:-1], np.int32)]).astype(np.int32)
        if s.n_prefix + len(cache) != s.n_past or self.memory.seq_pos_max(s.seq_id) != s.n_past - 1:
            log.warning("slot %d: KV does not hold the request's tokens; cache dropped", s.id)
            return False
        s.cache_tokens = cache
        return True

    def _evict_idle_cache(self) -> bool:
        """With a unified KV cache, free the cells of the least recently used idle slot that
        holds a prompt cache (llama-server does the same before halving the batch)."""
        if not self.config.kv_unified:
            return False  # each sequence has its own cells: evicting frees none for others
        idle = [s for s in self.slots if s.req is None and len(s.cache_tokens)]
        if not idle:
            return False
        s = min(idle, key=lambda s: s.t_last)
        log.info("KV cache full: dropping the prompt cache of idle slot %d (%d tokens)",
                 s.id, len(s.cache_tokens))
        self._reset_sequence(s, with_prefix=self.config.share_system_prompt)
        return True

    def _fail_token_owner(self, i: int) -> None:
        """Not even one token fits: fail the request that owns batch row i and drop its rows."""
        batch = self.batch
        seq = int(batch.seq_id[i, 0])
        slot = self.slots[seq - 1]
        log.error("KV cache full: request %s in slot %d fails (raise -c/--ctx-size)",
                  slot.req.id if slot.req else "?", slot.id)
        self._release(slot, FinishReason.ERROR,
                      "the KV cache is full: no room to continue this request (context size too small)")
        # Remove that sequence's remaining rows and re-point the other slots' logits rows.
        n = batch.n_tokens
        keep = batch.seq_id[i:n, 0] != seq
        new_index = np.full(n, -1, dtype=np.int64)
        new_index[:i] = np.arange(i)
        new_index[i:n][keep] = i + np.arange(int(keep.sum()))
        for arr in (batch.token, batch.pos, batch.n_seq_id, batch.logits):
            arr[i:i + int(keep.sum())] = arr[i:n][keep]
        batch.seq_id[i:i + int(keep.sum()), 0] = batch.seq_id[i:n, 0][keep]
        batch.n_tokens = i + int(keep.sum())
        for s in self.slots:
            if s.i_batch >= i:
                s.i_batch = int(new_index[s.i_batch])

    def _sample_range(self, lo: int, hi: int) -> None:
        """Sample for every slot whose logits row is in [lo, hi) of the batch just decoded."""
        st = self.stats
        vocab = self.vocab
        for s in self.slots:
            ib = s.i_batch
            if ib < lo or ib >= hi or s.req is None:
                continue
            s.i_batch = -1
            r = s.req
            t0 = time.perf_counter()
            tok = s.sampler.sample(self.ctx, ib - lo)
            now = time.perf_counter()
            st.t_sample += now - t0
            st.n_generated_tokens += 1
            if s.sampled < 0:
                r.timings.prompt_done = now
            s.sampled = tok
            r.tokens.append(tok)
            p = r.params
            check = len(r.tokens) > p.min_tokens
            if check and not p.ignore_eos and vocab.is_eog(tok):
                self._release(s, FinishReason.EOS)
                continue
            text, stop = s.matcher.feed(vocab.token_to_piece(tok), check)
            if p.n_probs > 0:
                t1 = time.perf_counter()
                lp, top = token_probs(self.ctx.logits(ib - lo), tok, p.n_probs)
                st.t_sample += time.perf_counter() - t1
                r._emit(text, [tok], [TokenProbs(tok, text, lp, top)])
            else:
                r._emit(text, [tok])
            if stop is not None:
                r.stopping_word = stop
                self._release(s, FinishReason.STOP)
            elif check and p.n_predict >= 0 and len(r.tokens) >= p.n_predict:
                self._release(s, FinishReason.LENGTH)
            elif s.n_past >= self.n_ctx_slot:  # no position left for the next token
                self._release(s, FinishReason.LENGTH)

    def _release(self, s: _Slot, reason: FinishReason, error: str | None = None) -> None:
        """Finish the slot's request. A finished request's tokens stay in the slot's KV as a
        prompt cache; a cancelled or failed one's cells are freed (back to the system prompt)."""
        r = s.req
        if r is None:
            return
        if reason in (FinishReason.EOS, FinishReason.LENGTH) and s.matcher is not None:
            r._emit(s.matcher.flush(), [])
        s.req = None
        s.sampled = -1
        s.i_batch = -1
        s.t_last = time.perf_counter()
        if not self._keep_cache(s, r, reason):
            self._reset_sequence(s, with_prefix=self.config.share_system_prompt)
        s.n_past = s.n_prefix + len(s.cache_tokens)
        s.kv_pos_max = self.memory.seq_pos_max(s.seq_id)
        st = self.stats
        if reason == FinishReason.CANCELLED:
            st.n_requests_cancelled += 1
        elif reason == FinishReason.ERROR:
            st.n_requests_failed += 1
        else:
            st.n_requests_done += 1
        with self._lock:
            self._all.discard(r)
        r._finish(reason, error)
