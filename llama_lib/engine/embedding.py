"""Embeddings: many inputs, from one request or many, decoded together in a context of their own.

The engine's generation context stays as it is (no output of every token, no logits buffer
sized for whole prompts); a second context over the same model, on the same thread pool, holds
the embedding lanes: `n_lanes` sequences in one unified KV buffer. Each engine step the
`Embedder` admits waiting inputs into free lanes (first come, first served, across requests),
puts up to `n_batch` of their tokens in one batch and decodes it with every token output.

Pooling is done here, from the per-token hidden states (the context pools nothing), and not by
llama.cpp: llama.cpp pools each micro-batch on its own, so an input split across micro-batches
(which its non-unified KV cache does to inputs of different lengths) comes out wrong, which is
how llama-server's vectors change with what else is in the request. Here an input's vector is
the same alone or in any batch, and for a causal model an input may be longer than a batch:
its next piece goes in the next step, attending to the earlier ones through the KV cache.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Sequence

import numpy as np

from .. import _bindings as B
from ..batch import Batch
from ..context import DECODE_NO_KV_SLOT, Context, ContextParams
from ..model import Model
from .handle import Handle
from .types import FinishReason, QueueFull, DEFAULT_EMBD_BATCH, DEFAULT_EMBD_LANES, DEFAULT_EMBD_NORMALIZE  # noqa: F401 (re-exported)

log = logging.getLogger("llama_lib.engine")

# An input's vector must not depend on its neighbours in a decode, and two things in the CPU
# backend would make it: matrix products take a batch's rows in groups (4 for repacked K-quants)
# and round the rest differently, and attention sums over the KV cells of a unified cache in
# SIMD groups (8, two accumulators of them), so where an input's cells sit changes the order of
# its sums (measured: cosine 0.99993 alone vs batched with 8-row alignment). A decode's tokens
# take the cells from the cache's head in row order, so every input piece starts at a multiple
# of ROW_ALIGN rows (and cells) and is padded to one with tokens of a scratch sequence. Flash
# attention is off in the embedding context: ggml's CPU kernel switches from a per-row path
# (accumulating in f16) to a tiled f32 one at 32 rows, and its tiles follow the batch (measured:
# cosine 0.99953). Alone or batched, the vectors come out bit-identical.
ROW_ALIGN = 16

# --pooling names (llama.cpp's) and their llama_pooling_type. "rank" needs the model's
# classification head inside the graph, which this engine does not run.
POOLING_TYPES = {"none": B.LLAMA_POOLING_TYPE_NONE, "mean": B.LLAMA_POOLING_TYPE_MEAN,
                 "cls": B.LLAMA_POOLING_TYPE_CLS, "last": B.LLAMA_POOLING_TYPE_LAST}
POOLING_NAMES = {v: k for k, v in POOLING_TYPES.items()}


class EmbeddingTooLong(ValueError):
    """An input that the embedding context cannot take (llama-server's messages)."""


def resolve_pooling(pooling: str | int | None, model: Model) -> int:
    """A llama_pooling_type from a --pooling name, a number or None (the model's default,
    none when its GGUF names none, as llama.cpp)."""
    if pooling is None or pooling == "":
        t = model.pooling_type
        t = B.LLAMA_POOLING_TYPE_NONE if t == B.LLAMA_POOLING_TYPE_UNSPECIFIED else t
    elif isinstance(pooling, str):
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)} (rank: reranking "
                             f"is not supported), got {pooling!r}")
        t = POOLING_TYPES[pooling]
    else:
        t = int(pooling)
    if t not in POOLING_NAMES:
        raise ValueError(f"pooling type {t} is not supported (rank needs reranking, which this "
                         "engine does not do)")
    return t


def normalize(v: np.ndarray, mode: int) -> np.ndarray:
    """llama.cpp's common_embd_normalize on float32 rows (the last axis)."""
    x = v.astype(np.float64)
    if mode < 0:
        return v.astype(np.float32)
    if mode == 0:
        s = np.abs(x).max(axis=-1, keepdims=True) / 32760.0
    elif mode == 2:
        s = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    else:
        s = (np.abs(x) ** mode).sum(axis=-1, keepdims=True) ** (1.0 / mode)
    with np.errstate(divide="ignore"):
        scale = np.where(s > 0, 1.0 / np.where(s > 0, s, 1), 0.0)
    return (x * scale).astype(np.float32)


class EmbeddingRequest(Handle):
    """Handle of submitted embedding inputs: `result()` blocks for the vectors, rows in input
    order; `cancel()` drops what is not computed yet. Written by the engine thread only.
    id, timings, finish_reason (STOP once every input is embedded), error, done, wait, cancel:
    handle.py, as a generation Request."""

    kind = "embedding request"

    def __init__(self, rid: int, inputs: list[np.ndarray], normalize_mode: int, pooling: int):
        super().__init__(rid)
        self.inputs = inputs
        self.normalize = normalize_mode
        self.pooling = pooling
        self.n_prompt_tokens = sum(len(t) for t in inputs)
        self.vectors: list[np.ndarray | None] = [None] * len(inputs)
        self._n_left = len(inputs)

    @property
    def submitted(self) -> float:
        """timings.submitted (the name this had before the handles shared a base)."""
        return self.timings.submitted

    @property
    def done_at(self) -> float:
        """timings.done (the name this had before the handles shared a base)."""
        return self.timings.done

    def result(self, timeout: float | None = None) -> list[np.ndarray]:
        """One float32 vector per input (pooling none: an (n_tokens, n_embd) array each).
        Raises RuntimeError if the request failed or was cancelled."""
        self._wait_or_raise(timeout)
        if self.error is not None:
            raise RuntimeError(self.error)
        if self.finish_reason == FinishReason.CANCELLED:
            raise RuntimeError(f"embedding request {self.id} was cancelled")
        return self.vectors  # type: ignore[return-value]

    def vectors_for(self, inputs, timeout: float | None = None) -> np.ndarray | list[np.ndarray]:
        """result() shaped as Engine.embed returns it: one vector for one input (a string or a
        token-id list), else a 2-D array (pooling none: a list of per-token arrays)."""
        try:
            vectors = self.result(timeout)
        except TimeoutError:
            self.cancel()
            raise
        if isinstance(inputs, (str, np.ndarray)) or _is_token_list(inputs):
            return vectors[0]
        return vectors if self.pooling == B.LLAMA_POOLING_TYPE_NONE else np.stack(vectors)

    def _put(self, index: int, vector: np.ndarray) -> None:
        self.vectors[index] = vector
        self._n_left -= 1
        if self._n_left == 0:
            self._finish()

    def _finish(self, error: str | None = None, cancelled: bool = False) -> None:
        if self._done.is_set():
            return
        if cancelled:
            self._cancel.set()
        reason = FinishReason.CANCELLED if cancelled else FinishReason.ERROR if error is not None else FinishReason.STOP
        self._record_end(reason, error)
        self._done.set()


@dataclasses.dataclass
class _Lane:
    """One sequence of the embedding context and the input it is decoding."""

    seq_id: int
    req: EmbeddingRequest | None = None
    index: int = 0
    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    pos: int = 0                     # tokens of the input already in a batch
    acc: np.ndarray | None = None    # mean: running sum; cls: the first row
    rows: list[np.ndarray] = dataclasses.field(default_factory=list)  # pooling none
    span: tuple[int, int] = (0, 0)   # this step's rows in the batch


class Embedder:
    """The embedding lanes of an engine (see the module docstring). Only the engine thread
    calls step(), warmup() and close(); submit() and cancel() may come from any thread."""

    def __init__(self, model: Model, base: ContextParams, *, pooling: int, n_lanes: int,
                 n_batch: int, n_ctx_input: int, normalize_mode: int, threadpool_of: Context,
                 lock: threading.Lock):
        self.model = model
        self._lock = lock  # the engine's: guards the queue against submit()
        self.pooling = pooling
        self.normalize = normalize_mode
        self.causal = model.causal_attention
        # A non-causal model sees its whole input at once: one micro-batch must hold it.
        n_batch = n_batch if self.causal else max(n_batch, base.n_ubatch)
        self.n_batch = max(ROW_ALIGN, n_batch - n_batch % ROW_ALIGN)
        self.n_ctx_input = n_ctx_input  # the most tokens of one input (a slot's context)
        # The inputs in flight, plus room for a batch of padding.
        params = dataclasses.replace(
            base, n_ctx=max(n_ctx_input, self.n_batch) + self.n_batch, n_batch=self.n_batch,
            n_ubatch=self.n_batch, n_seq_max=n_lanes + 1, kv_unified=True, embeddings=True,
            pooling_type=B.LLAMA_POOLING_TYPE_NONE, flash_attn=B.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            skip_output_layer=True)
        self.pad_seq = n_lanes  # the scratch sequence of the padding rows
        self.ctx = Context(model, params, threadpool_of=threadpool_of)
        self.n_ctx = self.ctx.n_ctx
        self.batch = Batch(self.n_batch, 1)
        self.lanes = [_Lane(i) for i in range(n_lanes)]
        self._active: list[_Lane] = []    # lanes with an input, in admission order
        self._queue: collections.deque[tuple[EmbeddingRequest, int]] = collections.deque()
        self._requests: set[EmbeddingRequest] = set()
        self._reserved = 0                # KV cells the active inputs will fill
        self._next_id = 0
        self._n_pad = 0                   # padding rows in the current batch
        self.n_inputs = 0                 # inputs embedded
        self.n_tokens = 0                 # their tokens
        self.t_embed = 0.0                # seconds in embedding steps

    @classmethod
    def for_engine(cls, model: Model, cfg, ctx: Context, n_ctx_slot: int,
                   lock: threading.Lock) -> "Embedder | None":
        """The lanes an EngineConfig asks for (None without embeddings), on ctx's thread pool."""
        if not cfg.embeddings:
            return None
        return cls(model, cfg.context, pooling=resolve_pooling(cfg.pooling, model),
                   n_lanes=cfg.embd_lanes, n_batch=min(cfg.embd_batch or DEFAULT_EMBD_BATCH, ctx.n_batch),
                   n_ctx_input=n_ctx_slot, normalize_mode=cfg.embd_normalize,
                   threadpool_of=ctx, lock=lock)

    # -- any thread (the engine calls these under its lock) ---------------------------------

    def check(self, tokens: np.ndarray) -> None:
        n = len(tokens)
        if n == 0:
            raise ValueError("Input content cannot be empty")
        if not self.causal and n > self.n_batch:
            raise EmbeddingTooLong(f"input ({n} tokens) is too large to process. increase the "
                                   f"physical batch size (current batch size: {self.n_batch})")
        if n > self.n_ctx_input:
            raise EmbeddingTooLong(f"input ({n} tokens) is larger than the max context size "
                                   f"({self.n_ctx_input} tokens). skipping")

    def make_request(self, inputs: str | Sequence, normalize_mode: int) -> EmbeddingRequest:
        """A request for `inputs` (see as_token_inputs), each checked; its id comes at enqueue."""
        vocab = self.model.vocab
        tokens = as_token_inputs(inputs, lambda t: vocab.tokenize(t, add_special=True, parse_special=True),
                                 vocab.n_tokens)
        if not tokens:
            raise ValueError("Input content cannot be empty")
        for t in tokens:
            self.check(t)
        return EmbeddingRequest(-1, tokens, int(normalize_mode), self.pooling)

    def enqueue(self, req: EmbeddingRequest, max_queue: int) -> None:
        """Queue a request's inputs (call with the engine's lock). QueueFull past max_queue
        requests' worth of lanes."""
        if len(self._queue) >= max_queue * len(self.lanes):
            raise QueueFull(f"{len(self._queue)} embedding inputs wait")
        self._next_id += 1
        req.id = self._next_id
        self._requests.add(req)
        self._queue.extend((req, i) for i in range(len(req.inputs)))

    @property
    def n_waiting(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue or self._active)

    # -- the engine thread ------------------------------------------------------------------

    def warmup(self) -> None:
        self.batch.clear()
        self.batch.add_sequence(np.array([max(0, self.model.vocab.bos)], np.int32), 0, 0)
        self.batch.logits[:1] = 1
        self.ctx.decode(self.batch.view())
        self.ctx.memory.clear(True)

    def step(self) -> bool:
        """Admit, batch, decode, pool. Returns False when there was nothing to decode."""
        t0 = time.perf_counter()
        self._drop_cancelled()
        self._admit()
        if not self._active:
            return False
        self._fill_batch()
        n = self.batch.n_tokens
        if n == 0:
            return False
        ret = self.ctx.decode(self.batch.view(0, n))
        if ret == DECODE_NO_KV_SLOT:  # cannot happen with the reservation; fail, do not loop
            for lane in list(self._active):
                self._fail(lane.req, "the embedding KV cache is full")
            return True
        self._pool(self.ctx.embeddings(n))
        self.ctx.memory.seq_rm(self.pad_seq, -1, -1)
        self.n_tokens += n - self._n_pad
        self.t_embed += time.perf_counter() - t0
        return True

    def close(self) -> None:
        with self._lock:
            left = list(self._requests)
        for req in left:
            req._finish(cancelled=True)
        self._requests.clear()
        self._queue.clear()
        self.batch.close()
        self.ctx.close()

    # -- the phases of a step -----------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._requests if r._cancel.is_set()]
        for r in gone:
            self._fail(r, None)

    def _admit(self) -> None:
        free = [ln for ln in self.lanes if ln.req is None]
        with self._lock:
            while free and self._queue:
                req, i = self._queue[0]
                n = len(req.inputs[i])
                if self._reserved and self._reserved + n > self.n_ctx - self.n_batch:
                    break  # wait for lanes to finish: the KV buffer holds every active input
                self._queue.popleft()
                lane = free.pop(0)
                lane.req, lane.index, lane.tokens, lane.pos = req, i, req.inputs[i], 0
                lane.acc, lane.rows = None, []
                self._reserved += n
                self._active.append(lane)

    def _fill_batch(self) -> None:
        """Pieces of the active inputs, first admitted first, each aligned (see ROW_ALIGN). An
        input that fits in one decode goes whole or waits for the next one: split, its second
        piece would attend to cells wherever the first landed, and its vector would depend on
        its neighbours. A longer input goes in pieces, each but the last a multiple of
        ROW_ALIGN long."""
        batch = self.batch
        batch.clear()
        budget = self.n_batch
        n_pad = 0
        for lane in self._active:
            lane.span = (0, 0)
            left = len(lane.tokens) - lane.pos
            whole = _aligned(len(lane.tokens)) <= self.n_batch
            n = left if _aligned(left) <= budget else 0 if whole else budget - budget % ROW_ALIGN
            if n <= 0 or (not self.causal and n < left):
                continue
            start = batch.n_tokens
            batch.add_sequence(lane.tokens[lane.pos:lane.pos + n], lane.pos, lane.seq_id,
                               logits_last=False)
            lane.span = (start, start + n)
            pad = _aligned(n) - n
            if pad:
                batch.add_sequence(np.full(pad, max(0, self.model.vocab.bos), np.int32), n_pad,
                                   self.pad_seq, logits_last=False)
                n_pad += pad
            budget -= n + pad
        self._n_pad = n_pad
        batch.logits[:batch.n_tokens] = 1  # every token is output (llama.cpp requires it too)

    def _pool(self, rows: np.ndarray) -> None:
        pooling = self.pooling
        for lane in list(self._active):
            s, e = lane.span
            if e == s:
                continue
            part = rows[s:e]
            if pooling == B.LLAMA_POOLING_TYPE_MEAN:
                piece = part.sum(axis=0, dtype=np.float64)
                lane.acc = piece if lane.acc is None else lane.acc + piece
            elif pooling == B.LLAMA_POOLING_TYPE_CLS:
                if lane.pos == 0:
                    lane.acc = part[0].astype(np.float64)
            elif pooling == B.LLAMA_POOLING_TYPE_NONE:
                lane.rows.append(part.copy())
            lane.pos += e - s
            if lane.pos < len(lane.tokens):
                continue
            if pooling == B.LLAMA_POOLING_TYPE_MEAN:
                vec = normalize(lane.acc / len(lane.tokens), lane.req.normalize)
            elif pooling == B.LLAMA_POOLING_TYPE_CLS:
                vec = normalize(lane.acc, lane.req.normalize)
            elif pooling == B.LLAMA_POOLING_TYPE_LAST:
                vec = normalize(part[-1], lane.req.normalize)
            else:  # none: per-token vectors, not normalised (as llama-server)
                vec = np.concatenate(lane.rows)
            req = lane.req
            self._free(lane)
            self.n_inputs += 1
            req._put(lane.index, vec)
            if req.done:
                with self._lock:
                    self._requests.discard(req)

    def _free(self, lane: _Lane) -> None:
        self.ctx.memory.seq_rm(lane.seq_id, -1, -1)
        self._reserved -= len(lane.tokens)
        self._active.remove(lane)
        lane.req, lane.acc, lane.rows = None, None, []
        lane.tokens = np.zeros(0, np.int32)

    def _fail(self, req: EmbeddingRequest, error: str | None) -> None:
        """End a request (error None: cancelled): its queued inputs go, its lanes are freed."""
        for lane in [ln for ln in self._active if ln.req is req]:
            self._free(lane)
        with self._lock:
            self._queue = collections.deque(q for q in self._queue if q[0] is not req)
            self._requests.discard(req)
        req._finish(error=error, cancelled=error is None)


def as_token_inputs(inputs: str | Sequence, tokenize, n_vocab: int) -> list[np.ndarray]:
    """Inputs as token arrays: a string, a list of token ids (one input), or a list of strings
    and/or token-id lists (many). Token ids outside 0..n_vocab-1 are a ValueError."""
    def one(x) -> np.ndarray:
        if isinstance(x, str):
            if not x:  # BOS alone is no content (llama-server would embed it)
                raise ValueError("Input content cannot be empty")
            return tokenize(x)
        if not (isinstance(x, np.ndarray) or _is_token_list(x) or (isinstance(x, Sequence) and not x)):
            raise ValueError("an input must be a string or a list of token ids")
        try:
            ids = np.asarray(x, dtype=np.int64).reshape(-1)
        except OverflowError:  # beyond int64: certainly out of range
            bad = next(t for t in x if not -2**63 <= int(t) < 2**63)
            raise ValueError(f"token id {bad} is out of range: ids must be in 0..{n_vocab - 1}") from None
        bad = ids[(ids < 0) | (ids >= n_vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range: ids must be in 0..{n_vocab - 1}")
        return ids.astype(np.int32)
    if isinstance(inputs, (str, np.ndarray)) or _is_token_list(inputs):
        return [one(inputs)]
    if not isinstance(inputs, Sequence):
        raise ValueError("inputs must be a string, a list of token ids, or a list of those")
    return [one(x) for x in inputs]


def _aligned(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def _is_token_list(x) -> bool:
    return (isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0
            and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x))
