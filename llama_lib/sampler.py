"""Sampler: a llama_sampler chain built from per-request sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _bindings as B
from ._resource import OwnedPointer
from .loader import lib


@dataclass
class SamplingParams:
    """Sampling settings with llama.cpp's defaults (common_params_sampling).

    temperature <= 0 means greedy. seed None (or LLAMA_DEFAULT_SEED) draws a random seed.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self, n_vocab: int | None = None) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if not (self.temperature == self.temperature) or self.temperature > 100:  # NaN or silly
            raise ValueError("temperature must be a number between 0 and 100")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        for name in ("top_p", "min_p", "typical_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if not 0.0 < self.repeat_penalty <= 10.0:
            raise ValueError("repeat_penalty must be in (0, 10]")
        if self.repeat_last_n < -1:
            raise ValueError("repeat_last_n must be >= -1")
        if self.seed is not None and not -(2**31) <= self.seed < 2**32:
            raise ValueError("seed must fit in 32 bits")
        if n_vocab is not None:
            for tok in self.logit_bias:
                if not 0 <= tok < n_vocab:
                    raise ValueError(f"logit_bias token {tok} is outside the vocabulary")


class Sampler(OwnedPointer):
    """A sampler chain; `sample(ctx, i)` picks a token from output row i of the last decode."""

    def __init__(self, params: SamplingParams, n_vocab: int):
        L = lib()
        self.params = params
        self._free = L.llama_sampler_free
        self._sample = L.llama_sampler_sample
        chain_params = L.llama_sampler_chain_default_params()
        chain_params.no_perf = False
        self.ptr = L.llama_sampler_chain_init(chain_params)
        if not self.ptr:
            raise MemoryError("llama_sampler_chain_init failed")

        def add(smpl: int | None) -> None:
            if not smpl:
                raise RuntimeError("could not create a sampler (check the parameters)")
            L.llama_sampler_chain_add(self.ptr, smpl)  # the chain owns it from here on

        p = params
        if p.logit_bias:
            arr = (B.llama_logit_bias * len(p.logit_bias))()
            for i, (tok, bias) in enumerate(p.logit_bias.items()):
                arr[i].token, arr[i].bias = int(tok), float(bias)
            add(L.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            last_n = p.repeat_last_n
            add(L.llama_sampler_init_penalties(n_vocab, last_n, p.repeat_penalty,
                                               p.frequency_penalty, p.presence_penalty))
        if p.temperature <= 0:
            add(L.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(L.llama_sampler_init_top_k(p.top_k))
            if p.typical_p < 1.0:
                add(L.llama_sampler_init_typical(p.typical_p, 1))
            if p.top_p < 1.0:
                add(L.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(L.llama_sampler_init_min_p(p.min_p, 1))
            add(L.llama_sampler_init_temp(p.temperature))
            seed = B.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            add(L.llama_sampler_init_dist(seed))

    def sample(self, ctx, i: int) -> int:
        """Sample from output row i of ctx's last decode and accept the token into the chain."""
        return self._sample(self.ptr, ctx.ptr, i)

    def accept(self, token: int) -> None:
        lib().llama_sampler_accept(self.ptr, token)

    def reset(self) -> None:
        lib().llama_sampler_reset(self.ptr)

    @property
    def seed(self) -> int:
        return lib().llama_sampler_get_seed(self.ptr)
