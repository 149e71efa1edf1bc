"""Context (a model instance with its KV cache) and Memory (operations on that cache)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import _bindings as B
from . import cpuset
from ._resource import OwnedPointer
from .loader import lib, library
from .model import Model

log = logging.getLogger("llama_lib")


class ContextError(RuntimeError):
    """libllama could not create a context with the requested parameters."""


class DecodeError(RuntimeError):
    """llama_decode failed for a reason other than a full KV cache."""

    def __init__(self, code: int, n_tokens: int):
        super().__init__(f"llama_decode failed with code {code} on a batch of {n_tokens} tokens")
        self.code = code


# llama_decode's return code (llama.h) when the KV cache has no room for the batch; 0 is ok,
# 2 aborted, < 0 an error (Context.decode raises DecodeError for those).
DECODE_NO_KV_SLOT = 1
# sequence ids must be below this (src/llama-cparams.h; not in llama.h), so n_seq_max too
LLAMA_MAX_SEQ = 256


@dataclass
class ContextParams:
    """The settings of llama_context_params that this project exposes, with llama.cpp's meaning.

    n_ctx = 0 takes the model's training context, as llama.cpp does.
    """

    n_ctx: int = 0                 # total KV cells; 0 = the model's training context
    n_batch: int = 2048            # most tokens handed to one llama_decode call
    n_ubatch: int = 512            # most tokens llama.cpp computes at once inside a decode
    n_seq_max: int = 1
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 4)
    n_threads_batch: int = field(default_factory=lambda: os.cpu_count() or 4)
    kv_unified: bool = False       # one KV buffer shared by all sequences
    swa_full: bool = False
    flash_attn: int = B.LLAMA_FLASH_ATTN_TYPE_AUTO  # llama_flash_attn_type: -1 auto, 0 off, 1 on
    type_k: int = B.GGML_TYPE_F16  # ggml_type of the K cache (llama.cpp's -ctk)
    type_v: int = B.GGML_TYPE_F16  # ggml_type of the V cache (-ctv; quantized needs flash attention)
    no_perf: bool = False
    # Output hidden states too (llama_set_embeddings can switch it per decode), pooled by
    # sequence as pooling_type says (llama_pooling_type; -1: the model's default).
    embeddings: bool = False
    pooling_type: int = B.LLAMA_POOLING_TYPE_UNSPECIFIED
    # An embeddings-only context (embeddings=True, pooling NONE): stop each decode's graph once
    # the hidden states it extracts are computed, so the projection to the vocabulary, which
    # llama.cpp runs for every output token even here (over half the work of the default model,
    # 262,144 tokens by 640), never runs; the context's logits are then garbage. Done through the
    # scheduler's eval callback, whose "stop" ends the graph cleanly: the decode succeeds and
    # the hidden states are extracted as usual, bit for bit the same.
    skip_output_layer: bool = False
    # A persistent ggml thread pool per context, as llama.cpp's own programs attach (common_init).
    # Without one, a libllama built without OpenMP (the prebuilt one) starts and joins its worker
    # threads inside every llama_decode, which costs latency and stalls under load. With OpenMP
    # the pool only adds a hand-over to OpenMP's own team (about 8 % slower measured), so None,
    # the default, attaches one exactly when the library was built without OpenMP.
    threadpool: bool | None = None
    poll: int = 50  # how long idle pool threads busy-wait for work, 0-100 (llama.cpp --poll)
    prio: int = B.GGML_SCHED_PRIO_NORMAL  # pool thread priority, -1..3 (llama.cpp --prio)
    # CPUs the context's threads run on (llama.cpp's -C/-Cr/--cpu-strict for generation,
    # -Cb/-Crb/--cpu-strict-batch for prompt batches; llama_lib.cpuset); () = any CPU. ggml
    # applies a set through a thread pool only (its own pool threads, or with OpenMP each thread
    # of the team at every graph), so a set makes threadpool=None attach a pool on either build,
    # and threadpool=False with a set is refused. strict: one CPU per thread, in turn.
    cpumask: tuple[int, ...] = ()
    strict_cpu: bool = False
    cpumask_batch: tuple[int, ...] | None = None  # None: the same as cpumask
    strict_cpu_batch: bool | None = None          # None: the same as strict_cpu

    def cpu_sets(self) -> tuple[tuple[int, ...], bool, tuple[int, ...], bool]:
        """(cpus, strict, batch cpus, batch strict) with the batch defaults resolved."""
        batch = self.cpumask if self.cpumask_batch is None else self.cpumask_batch
        strict_b = self.strict_cpu if self.strict_cpu_batch is None else self.strict_cpu_batch
        return tuple(self.cpumask), self.strict_cpu, tuple(batch), strict_b


# What llama.cpp names the hidden states an embeddings context extracts with pooling NONE: the
# final norm's output (t_embd, "result_norm"), renamed by build_pooling in llama-graph.cpp.
HIDDEN_STATES = b"result_embd_pooled"


def _stop_at_hidden_callback():
    """The eval callback of ContextParams.skip_output_layer: asked of every node whether it is
    wanted, it wants only HIDDEN_STATES; told that one is computed, it answers "stop"."""
    name_of = library().ggml.ggml_get_name

    def cb(tensor, ask, _user):
        return ask and name_of(tensor) == HIDDEN_STATES

    return B.ggml_backend_sched_eval_callback(cb)


class Memory:
    """The KV cache of a context: per-sequence removal, copy and position queries."""

    def __init__(self, ctx: "Context"):
        self._ctx = ctx
        self.ptr = lib().llama_get_memory(ctx.ptr)

    def clear(self, data: bool = True) -> None:
        lib().llama_memory_clear(self.ptr, data)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (-1: open end). False if it cannot be done."""
        return bool(lib().llama_memory_seq_rm(self.ptr, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        lib().llama_memory_seq_cp(self.ptr, src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        lib().llama_memory_seq_keep(self.ptr, seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        lib().llama_memory_seq_add(self.ptr, seq_id, p0, p1, delta)

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position held for the sequence, -1 when it holds none."""
        return lib().llama_memory_seq_pos_min(self.ptr, seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position held for the sequence, -1 when it holds none."""
        return lib().llama_memory_seq_pos_max(self.ptr, seq_id)

    @property
    def can_shift(self) -> bool:
        return bool(lib().llama_memory_can_shift(self.ptr))


class Context(OwnedPointer):
    """A llama_context over a Model. Only one thread may use it at a time.
    """

    _threadpools: tuple[int, ...] = ()  # the pools this context owns (freed in close())
    _attached: tuple[int, int | None] | None = None  # (pool, batch pool) it runs on
    # CPUs the thread calling llama_decode is pinned to (ggml's pool thread 0; () = not pinned)
    # and the thread last pinned, so a decode from a new thread pins that one first.
    pin_cpus: tuple[int, ...] = ()
    _pinned_thread: int | None = None

    def __init__(self, model: Model, params: ContextParams | None = None, *,
                 threadpool_of: "Context | None" = None, **overrides):
        """`threadpool_of`: run on that context's thread pool instead of one of its own (both
        must then be used from one thread, and that context must outlive this one)."""
        self.model = model  # the model must outlive the context
        p = params or ContextParams()
        for k, v in overrides.items():
            if not hasattr(p, k):
                raise TypeError(f"unknown context parameter {k!r}")
            setattr(p, k, v)
        self.params = p
        L = lib()
        cp = L.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = p.n_batch
        cp.n_ubatch = min(p.n_ubatch, p.n_batch) if p.n_batch else p.n_ubatch
        cp.n_seq_max = p.n_seq_max
        cp.n_threads = p.n_threads
        cp.n_threads_batch = p.n_threads_batch
        cp.kv_unified = p.kv_unified
        cp.swa_full = p.swa_full
        cp.flash_attn_type = p.flash_attn
        cp.type_k = p.type_k
        cp.type_v = p.type_v
        cp.no_perf = p.no_perf
        cp.embeddings = p.embeddings
        cp.pooling_type = p.pooling_type
        if p.skip_output_layer:
            if not p.embeddings or p.pooling_type != B.LLAMA_POOLING_TYPE_NONE:
                raise ValueError("skip_output_layer needs embeddings=True and pooling_type NONE")
            self._stop_at_hidden = _stop_at_hidden_callback()  # kept alive with the context
            cp.cb_eval = self._stop_at_hidden
        self._free = L.llama_free
        self._decode = L.llama_decode
        self._get_logits_ith = L.llama_get_logits_ith
        self._embeddings_on: bool = p.embeddings
        self.ptr = L.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise ContextError(
                f"llama_init_from_model failed (n_ctx={p.n_ctx}, n_batch={p.n_batch}, "
                f"n_seq_max={p.n_seq_max}, type_k={p.type_k}, type_v={p.type_v}, "
                f"flash_attn={p.flash_attn}; max parallel sequences is "
                f"{L.llama_max_parallel_sequences()}); see the llama_lib.cpp log"
            )
        cpus, _, cpus_batch, _ = p.cpu_sets()
        pinned = bool(cpus or cpus_batch)
        want_pool = (not library().build_info.openmp or pinned) if p.threadpool is None else p.threadpool
        if threadpool_of is not None:
            if threadpool_of._attached is not None:
                self._attached = threadpool_of._attached
                self.pin_cpus = threadpool_of.pin_cpus
                L.llama_attach_threadpool(self.ptr, *self._attached)
        elif pinned and not want_pool:
            self.close()
            raise ValueError("a CPU set (cpumask) is applied through a ggml thread pool; "
                             "threadpool=False would ignore it")
        elif want_pool:
            try:
                self._attach_threadpools(p)
            except Exception:
                self.close()
                raise
        self.n_ctx: int = L.llama_n_ctx(self.ptr)
        self.n_ctx_seq: int = L.llama_n_ctx_seq(self.ptr)
        self.n_batch: int = L.llama_n_batch(self.ptr)
        self.n_ubatch: int = L.llama_n_ubatch(self.ptr)
        self.n_seq_max: int = L.llama_n_seq_max(self.ptr)
        self.memory = Memory(self)
        self.n_vocab = model.vocab.n_tokens
        self.n_embd_out: int = L.llama_model_n_embd_out(model.ptr)
        self.pooling_type: int = L.llama_pooling_type(self.ptr)  # resolved: never -1
        # Time spent inside llama_decode, for the "share of wall time" figures.
        self.t_decode = 0.0
        self.n_decode_calls = 0

    def _attach_threadpools(self, p: ContextParams) -> None:
        """Create the generation and batch thread pools and attach them (freed in close())."""
        if not 0 <= p.poll <= 100:
            raise ValueError(f"poll must be in 0..100, got {p.poll}")
        if not B.GGML_SCHED_PRIO_LOW <= p.prio <= B.GGML_SCHED_PRIO_REALTIME:
            raise ValueError(f"prio must be in -1..3, got {p.prio}")
        libr = library()
        new = libr.cpu_function("ggml_threadpool_new")
        self._free_threadpool = libr.cpu_function("ggml_threadpool_free")
        cpus, strict, cpus_b, strict_b = p.cpu_sets()
        if new is None or self._free_threadpool is None:
            if cpus or cpus_b:
                raise ContextError("the CPU backend exports no thread pool functions: "
                                   "a CPU set cannot be applied")
            log.warning("the CPU backend exports no thread pool functions; ggml will start "
                        "threads inside every decode")
            return
        g = libr.ggml
        cpus = cpuset.available(cpus, "CPU set") if cpus else ()
        cpus_b = cpuset.available(cpus_b, "batch CPU set") if cpus_b else ()

        def pool_params(n_threads: int, cpus: tuple[int, ...], strict: bool) -> B.ggml_threadpool_params:
            tpp = g.ggml_threadpool_params_default(n_threads)
            tpp.poll = p.poll
            tpp.prio = p.prio
            if cpus:
                cpuset.fill_mask(tpp.cpumask, cpus)
                tpp.strict_cpu = strict
                if len(cpus) < n_threads:  # llama.cpp's postprocess_cpu_params warns the same
                    log.warning("%d threads on %d CPUs (%s): threads will share CPUs",
                                n_threads, len(cpus), cpuset.format_cpus(cpus))
            return tpp

        tpp = pool_params(p.n_threads, cpus, strict)
        tpp_batch = pool_params(p.n_threads_batch, cpus_b, strict_b)
        openmp = libr.build_info.openmp
        self.pin_cpus = cpuset.union(cpuset.first_worker_cpus(cpus, strict, p.n_threads, openmp),
                                     cpuset.first_worker_cpus(cpus_b, strict_b, p.n_threads_batch, openmp))
        # ggml pins the creating thread as pool thread 0; the context is created on one thread
        # and decoded on another (the engine's), so give the creator its CPUs back afterwards.
        creator_cpus = os.sched_getaffinity(0) if self.pin_cpus else None
        try:
            self._new_pools(new, tpp, tpp_batch, p)
        finally:
            if creator_cpus is not None:
                os.sched_setaffinity(0, creator_cpus)

    def _new_pools(self, new, tpp: B.ggml_threadpool_params, tpp_batch: B.ggml_threadpool_params,
                   p: ContextParams) -> None:
        g = library().ggml
        batch_pool = None
        if not g.ggml_threadpool_params_match(ctypes.byref(tpp), ctypes.byref(tpp_batch)):
            batch_pool = new(ctypes.byref(tpp_batch))
            if not batch_pool:
                raise ContextError(f"ggml_threadpool_new failed for {p.n_threads_batch} threads")
            self._threadpools += (batch_pool,)
            tpp.paused = True  # one pool runs at a time; ggml resumes the one it switches to
        pool = new(ctypes.byref(tpp))
        if not pool:
            raise ContextError(f"ggml_threadpool_new failed for {p.n_threads} threads")
        self._threadpools += (pool,)
        self._attached = (pool, batch_pool)
        lib().llama_attach_threadpool(self.ptr, pool, batch_pool)

    def pin_calling_thread(self) -> None:
        """Pin the calling thread to pool thread 0's CPUs: it computes its share of every graph
        (ggml pins it only when it resumes a paused pool, or with OpenMP at n_threads > 1)."""
        os.sched_setaffinity(0, self.pin_cpus)
        self._pinned_thread = threading.get_ident()

    def set_n_threads(self, n_threads: int, n_threads_batch: int) -> None:
        """Threads of the next decodes (llama_set_n_threads); on the thread that decodes."""
        lib().llama_set_n_threads(self.ptr, max(1, n_threads), max(1, n_threads_batch))

    @property
    def threadpool_attached(self) -> bool:
        """Whether this context runs on a persistent ggml thread pool (ContextParams.threadpool)."""
        return self._attached is not None

    def close(self) -> None:
        """Free the context, then its thread pools, which it uses until llama_free (idempotent)."""
        super().close()
        pools, self._threadpools = self._threadpools, ()
        for pool in pools:
            self._free_threadpool(pool)

    def seq_state(self, seq_id: int) -> bytes:
        """One sequence's KV state as bytes (llama_state_seq_get_data)."""
        return bytes(self.seq_state_view(seq_id))

    def seq_state_size(self, seq_id: int) -> int:
        """The bytes seq_state would return (counted, nothing copied)."""
        return lib().llama_state_seq_get_size(self.ptr, seq_id)

    def seq_state_view(self, seq_id: int) -> memoryview:
        """seq_state without the copy to bytes: a view of the buffer libllama filled (a slot
        file writes it out directly, so a large state is held once)."""
        L = lib()
        size = L.llama_state_seq_get_size(self.ptr, seq_id)
        buf = (ctypes.c_uint8 * max(1, size))()
        n = L.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        return memoryview(buf).cast("B")[:n]

    def set_seq_state(self, seq_id: int, data: bytes | bytearray) -> bool:
        """Load bytes from seq_state into sequence `seq_id` (emptied first by the caller);
        False when llama.cpp refuses them (no KV room, another model or context). A bytearray
        is passed without a copy."""
        array = ctypes.c_uint8 * len(data)
        buf = array.from_buffer(data) if isinstance(data, bytearray) else array.from_buffer_copy(data)
        return lib().llama_state_seq_set_data(self.ptr, buf, len(data), seq_id) == len(data)

    def seq_save_file(self, path: str, seq_id: int, tokens: np.ndarray) -> int:
        """Write one sequence's KV state and its tokens to a file (llama_state_seq_save_file);
        returns the bytes written. Raises ContextError if nothing could be written."""
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = lib().llama_state_seq_save_file(self.ptr, os.fsencode(path), seq_id,
                                            toks.ctypes.data_as(ctypes.POINTER(B.llama_token)), len(toks))
        if not n:
            raise ContextError(f"could not save sequence {seq_id} to {path}")
        return int(n)

    def seq_load_file(self, path: str, seq_id: int, max_tokens: int) -> tuple[np.ndarray, int]:
        """Load a file written by seq_save_file into sequence `seq_id`: (its tokens, bytes read).
        Raises ContextError when the file is not a sequence state of this model and context,
        holds more than max_tokens tokens, or the KV cache has no room."""
        out = np.zeros(max(1, max_tokens), dtype=np.int32)
        count = ctypes.c_size_t(0)
        n = lib().llama_state_seq_load_file(self.ptr, os.fsencode(path), seq_id,
                                            out.ctypes.data_as(ctypes.POINTER(B.llama_token)), len(out),
                                            ctypes.byref(count))
        if not n:
            raise ContextError("no available space in the KV cache, or not a valid slot save file")
        return out[:count.value].copy(), int(n)

    def decode(self, batch: B.llama_batch) -> int:
        """Run llama_decode. Returns 0, or 1 when the KV cache has no room for the batch
        (the caller may retry with a smaller batch); raises DecodeError on real failures."""
        if batch.n_tokens > self.n_batch:  # llama_decode GGML_ASSERTs on this: it would abort()
            raise ValueError(f"a batch of {batch.n_tokens} tokens exceeds n_batch={self.n_batch}; "
                             "split it into chunks of at most n_batch tokens")
        if self.pin_cpus and self._pinned_thread != threading.get_ident():
            self.pin_calling_thread()
        t0 = time.perf_counter()
        ret = self._decode(self.ptr, batch)
        self.t_decode += time.perf_counter() - t0
        self.n_decode_calls += 1
        if ret < 0 or ret > 1:
            raise DecodeError(ret, batch.n_tokens)
        return ret

    def set_embeddings(self, on: bool) -> None:
        """Whether the next decodes output hidden states. While on, llama.cpp outputs every token
        of a batch (and computes its logits too), so generation batches should run with it off."""
        if on != self._embeddings_on:
            lib().llama_set_embeddings(self.ptr, on)
            self._embeddings_on = on

    def embeddings(self, n_rows: int) -> np.ndarray:
        """The hidden states of the last decode's first n_rows outputs (in batch order), a
        float32 view of shape (n_rows, n_embd_out) valid until the next decode. Needs
        embeddings on and pooling type none."""
        ptr = lib().llama_get_embeddings(self.ptr)
        if not ptr:
            raise RuntimeError("the last decode produced no embeddings (embeddings off?)")
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_embd_out))

    def embeddings_ith(self, i: int) -> np.ndarray:
        """The hidden state of batch row i of the last decode (pooling none), a view."""
        ptr = lib().llama_get_embeddings_ith(self.ptr, i)
        if not ptr:
            raise IndexError(f"no embedding for batch index {i} in the last decode")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd_out,))

    def embeddings_seq(self, seq_id: int) -> np.ndarray:
        """The pooled embedding of a sequence in the last decode (a pooling type other than
        none), a view."""
        ptr = lib().llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise IndexError(f"no pooled embedding for sequence {seq_id} in the last decode")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd_out,))

    def logits(self, i: int) -> np.ndarray:
        """Logits of output row i of the last decode (-1: the last one), as a numpy view."""
        ptr = self._get_logits_ith(self.ptr, i)
        if not ptr:
            raise IndexError(f"no logits for batch index {i} in the last decode")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
