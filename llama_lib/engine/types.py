"""The engine's public value types: configuration, request parameters, output and statistics.

Plain data with no behaviour beyond derived properties; every other engine module imports it,
it imports none of them.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..context import LLAMA_MAX_SEQ, ContextParams
from ..sampler import SamplingParams
from .spec_params import RequestSpec, SpecParams

# EngineConfig.prefill_chunk: the most prompt tokens put in one step beside the generating
# slots, so a long prompt is prefilled in pieces instead of stalling the streams. The default
# is llama.cpp's default n_ubatch (the server's --prefill-chunk default, the ubatch size);
# PREFILL_WHOLE_PROMPT puts whole prompts in one step, as llama.cpp's parallel example does.
DEFAULT_CACHE_RAM_MIB = 8192  # llama-server's default
DEFAULT_PREFILL_CHUNK = 512
PREFILL_WHOLE_PROMPT = 0
# llama.cpp's --embd-normalize default: euclidean (-1 none, 0 max-abs int16, 1 taxicab, p>2 p-norm)
DEFAULT_EMBD_NORMALIZE = 2
# Tokens per embedding decode when EngineConfig.embd_batch is 0. Every token of an embedding
# decode is output, logits included (a 262k-token vocabulary makes that 1 MiB a token in
# llama.cpp's output buffer); measured here, 64-128 tokens a decode were the fastest.
DEFAULT_EMBD_BATCH = 128
DEFAULT_EMBD_LANES = 16  # inputs decoded at once by default


class FinishReason(str, enum.Enum):
    EOS = "eos"              # the model produced an end-of-generation token
    STOP = "stop"            # a stop string (anti-prompt) was generated
    LENGTH = "length"        # n_predict reached, or the slot's context is full
    CANCELLED = "cancelled"  # the caller cancelled (or went away)
    ERROR = "error"          # the request could not be served (see `error`)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit."""


class UserQueueFull(QueueFull):
    """The request's user has EngineConfig.max_queue_per_user requests waiting already (others
    still get in); `retry_after`: seconds after which one of them has likely started."""

    def __init__(self, message: str, user: str, retry_after: int):
        super().__init__(message)
        self.user = user
        self.retry_after = retry_after


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


class _ContextSetting:
    """An EngineConfig attribute kept in its ContextParams, so a context setting is declared once
    (in ContextParams) and still reads and writes as `config.n_ctx`."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __get__(self, config: EngineConfig | None, owner: type | None = None) -> Any:
        return self if config is None else getattr(config.context, self.name)

    def __set__(self, config: EngineConfig, value: Any) -> None:
        setattr(config.context, self.name, value)


# ContextParams fields EngineConfig accepts and forwards; n_seq_max follows n_parallel instead,
# and the embedding settings are the engine's own (its embedding lanes have a context of theirs).
CONTEXT_SETTINGS = tuple(f.name for f in dataclasses.fields(ContextParams)
                         if f.name not in ("n_seq_max", "embeddings", "pooling_type"))


@dataclass(init=False)
class EngineConfig:
    """How the engine sizes its context and schedules requests (llama.cpp's names).

    The context settings (n_ctx, n_batch, n_ubatch, n_threads, kv_unified, flash_attn, type_k,
    threadpool, ...) live in `context`, a ContextParams; they are accepted as keywords and read
    and written as attributes too: `EngineConfig(n_parallel=4, n_ctx=8192).n_ctx == 8192`.
    """

    n_parallel: int = 4            # slots (simultaneous requests)
    cont_batching: bool = True     # admit new requests while others generate
    system_prompt: str = ""        # text every request continues
    share_system_prompt: bool = True  # decode it once into sequence 0 and copy it to slots
    max_queue: int = 256           # requests waiting for a slot before submit() refuses
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per step (0: whole prompts)
    warmup: bool = True            # one throw-away decode at start, as llama.cpp's programs do
    # llama-server's --slot-prompt-similarity: a free slot whose cached tokens share at least
    # this fraction of a new prompt (as a prefix) is preferred; 0 = always the lowest free
    # slot (whose cache is still reused as far as it matches).
    slot_prompt_similarity: float = 0.1
    # llama-server's --cache-ram: MiB of host RAM for slot caches about to be overwritten,
    # loaded back when a later prompt suits them better (ram_cache.py); 0 off, -1 no limit
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB
    # A request copies the longest prompt prefix any KV sequence holds (another slot's cache or
    # a live request's) and waits for one still being decoded, instead of decoding it again
    prefix_share: bool = True
    # With a KV stream per slot: each step's batch in order of sequence id, a throw-away token
    # for an idle slot between busy ones, and prompts that start together padded to one length
    # when that saves passes, so llama.cpp decodes it in fewer ubatches (seq_order.py). False
    # keeps llama.cpp's own order (as llama-parallel and llama-server).
    pack_sequences: bool = True
    # Spare KV sequences that keep idle prompt prefixes a slot is about to overwrite, for later
    # requests to copy (holders.py); only with a unified KV cache and prefix_share (else 0).
    # -1: as many as slots
    kv_holders: int = -1
    # Embeddings (Engine.embed / submit_embedding), in a context of their own (embedding.py):
    embeddings: bool = False       # llama.cpp's --embedding
    pooling: str | None = None     # none|mean|cls|last; None: the model's (none if it names none)
    embd_normalize: int = DEFAULT_EMBD_NORMALIZE  # --embd-normalize
    embd_lanes: int = DEFAULT_EMBD_LANES  # inputs decoded at once (the embedding context's sequences)
    embd_batch: int = 0            # tokens per embedding decode; 0: DEFAULT_EMBD_BATCH (<= n_ubatch)
    # Threads that run submit(on_chunk=, on_done=) callbacks (callbacks.py), started at the first
    # such request: as many requests' callbacks can be slow at once before others wait.
    callback_threads: int = 4
    # llama-server's --context-shift: a generation that fills its slot drops tokens after the
    # first n_keep (ctx_shift.py) instead of ending with "length"; only where the KV memory can
    # shift (llama_memory_can_shift), else off with a warning, as llama-server
    context_shift: bool = False
    # llama-server's --cache-idle-slots: when a request starts, idle slots' caches are saved to
    # the RAM tier (and, with a unified KV cache, cleared); needs --cache-ram
    cache_idle_slots: bool = False
    # Scheduling between users (waiting.py, preempt.py; docs/scheduling.md): "fair" takes the
    # next request from the user who has had the fewest tokens decoded (prompt and generated),
    # FCFS within a user; "fcfs" takes them in arrival order. Either way a lower
    # RequestParams.priority goes first.
    schedule: str = "fair"
    max_queue_per_user: int = -1   # requests one user may have waiting (-1: only max_queue)
    # A waiting request of better priority (or whose user is far below its share of the slots)
    # that waited this long parks the worst running request's KV and takes its slot; -1: never
    preempt_after_ms: int = 0
    # llama-server's --spec-type and its flags (spec_params.py, speculative.py); None: off
    speculative: SpecParams | None = None
    context: ContextParams = field(default_factory=ContextParams)

    def __init__(self, n_parallel: int = 4, *, context: ContextParams | None = None, **settings: Any):
        # A copy, so that configs made from one another (dataclasses.replace) share nothing.
        context = dataclasses.replace(context or ContextParams(),
                                      **{k: settings.pop(k) for k in CONTEXT_SETTINGS if k in settings})
        self.context = context
        self.n_parallel = n_parallel
        for f in dataclasses.fields(self):
            if f.name in ("n_parallel", "context"):
                continue
            if f.name in settings:
                setattr(self, f.name, settings.pop(f.name))
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
            else:
                setattr(self, f.name, f.default)
        if settings:
            raise TypeError(f"EngineConfig() got an unexpected keyword argument {next(iter(settings))!r}")

    @property
    def n_holders(self) -> int:
        """Holder sequences the engine has (kv_holders resolved; llama.cpp allows LLAMA_MAX_SEQ
        sequences in all)."""
        if not (self.kv_unified and self.prefix_share):
            return 0
        n = self.n_parallel if self.kv_holders < 0 else self.kv_holders
        return max(0, min(n, LLAMA_MAX_SEQ - self.n_parallel - 1))

    def context_params(self) -> ContextParams:
        """The parameters of the engine's context: `context` with a sequence per slot, one
        for the shared system prompt and the holders'."""
        return dataclasses.replace(self.context, n_seq_max=self.n_parallel + 1 + self.n_holders)


for _name in CONTEXT_SETTINGS:
    setattr(EngineConfig, _name, _ContextSetting(_name))
del _name


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
    # llama-server's return_progress: a `Progress` item in the request's stream when it starts
    # in its slot and after each decoded piece of its prompt (off: nothing is made or queued)
    return_progress: bool = False
    # special tokens whose text the output shows (a tool call's "[TOOL_CALLS]"): llama-server's
    # preserved_tokens; every other special token is written as nothing
    preserved_tokens: frozenset[int] = frozenset()
    # llama-server's n_probs: with n > 0 every generated token carries its log-probability and
    # the n most probable tokens (softmax of the raw logits row, before any sampler). 0: none.
    n_probs: int = 0
    # llama-server's post_sampling_probs: those figures are the probabilities the sampler chain
    # left (after top_k, temperature, ...; zeros dropped) instead of the raw logits' softmax
    post_sampling_probs: bool = False
    # llama-server's request controls (ctx_shift.py, output.py, prompt_cache.py):
    n_keep: int = 0                # context shift keeps the first n_keep prompt tokens (-1: all)
    n_discard: int = 0             # tokens a context shift drops after them (0: half the rest)
    n_indent: int = 0              # stop at a new line indented by fewer spaces/tabs (0: off)
    t_max_predict_ms: int = -1     # stop at a new line once generating took longer (<= 0: off)
    n_cache_reuse: int = 0         # reuse cached chunks of at least this many tokens past the
                                   # common prefix by shifting their KV (0: off)
    # who asks (fair scheduling between users; None: the shared bucket "") and the priority:
    # lower runs first, as vLLM's (EngineConfig.schedule)
    user: str | None = None
    priority: int = 0
    speculative: RequestSpec | None = None  # llama-server's speculative.n_max / n_min / p_min
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


@dataclass(frozen=True)
class Progress:
    """Prompt processing progress, queued in a request's stream (`RequestParams.return_progress`)
    between its chunks: llama-server's `prompt_progress`. Counts are of the whole prompt, the
    shared system prompt and the cached prefix included; the first one has processed == cache,
    the last one processed == total, before the first token's chunk."""

    total: int           # prompt tokens in all
    cache: int           # of those, found in the KV cache (not decoded)
    processed: int       # in the KV cache now (cache included)
    time_ms: float       # since the request started in its slot


@dataclass
class Timings:
    """Wall-clock instants (time.perf_counter) of a request's life."""

    submitted: float = 0.0
    started: float = 0.0           # admitted into a slot
    prompt_done: float = 0.0       # first token sampled
    done: float = 0.0
    draft_n: int = 0               # speculative decoding: draft tokens verified
    draft_n_accepted: int = 0      # and of those, kept

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
    # Seconds in each phase of step() (they add up to t_step, less the bookkeeping between):
    t_prepare: float = 0.0         # a new system prompt, cancelled requests
    t_admit: float = 0.0           # slot choice, prompt-cache reuse, samplers of new requests
    t_batch: float = 0.0           # filling the batch with generated tokens and prompt pieces
    t_decode_sample: float = 0.0   # llama_decode, sampling, stop rules, streaming, releases
    n_draft_tokens: int = 0        # speculative decoding: draft tokens verified,
    n_draft_accepted: int = 0      # of those kept,
    n_drafts: int = 0              # and verifications (llama-server's spec_decode_* metrics)
    _ctx: object = field(default=None, repr=False)
    _embedder: object = field(default=None, repr=False)
    _cache: object = field(default=None, repr=False)

    @property
    def n_prompt_tokens_cached_kv(self) -> int:
        """Cached prompt tokens found in KV: the slot's own cache or another sequence's."""
        h = self._cache.hits if self._cache is not None else {}
        return h.get("own", 0) + h.get("shared", 0)

    @property
    def n_prompt_tokens_cached_ram(self) -> int:
        """Cached prompt tokens loaded back from the host-RAM tier."""
        return self._cache.hits["ram"] if self._cache is not None else 0

    @property
    def n_cache_ram_bytes(self) -> int:
        """Bytes the host-RAM tier holds now."""
        c = self._cache
        return c.ram.n_bytes if c is not None and c.ram is not None else 0

    @property
    def n_embd_inputs(self) -> int:
        """Embedding inputs computed."""
        return self._embedder.n_inputs if self._embedder is not None else 0

    @property
    def n_embd_tokens(self) -> int:
        """Tokens decoded for embeddings (not in n_prompt_tokens)."""
        return self._embedder.n_tokens if self._embedder is not None else 0

    @property
    def t_embed(self) -> float:
        """Seconds in the embedding phase of steps (decode and pooling)."""
        return self._embedder.t_embed if self._embedder is not None else 0.0

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
