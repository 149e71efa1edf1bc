"""The sampler chain as llama.cpp's common_sampler_init builds it (common/sampling.cpp), and which
of its samplers are off, so the Sampler knows when a shortcut picks what the chain would pick.

Order: logit bias (the request's plus the model's suppress tokens), then `params.samplers` in
the given order, then dist (or adaptive-p when "adaptive_p" is listed). mirostat 1 / 2 replaces
all of that after the logit bias with temp + mirostat. Every listed sampler is added even when
its value turns it off, as upstream: samplers that are off return at once, and a chain of the
same samplers in the same order draws the same random numbers from the same seed.
"""

from __future__ import annotations

import ctypes

from . import _bindings as B
from .loader import lib
from .sampling_params import SamplingParams


def is_off(name: str, p: SamplingParams) -> bool:
    """True when sampler `name` leaves the candidates as they are (it returns at once)."""
    if name == "penalties":
        return p.repeat_last_n == 0 or (p.repeat_penalty == 1.0 and not p.frequency_penalty
                                        and not p.presence_penalty)
    if name == "dry":
        return p.dry_multiplier == 0.0 or p.dry_base < 1.0 or p.dry_penalty_last_n == 0
    if name == "top_n_sigma":
        return p.top_n_sigma <= 0.0
    if name == "top_k":
        return p.top_k <= 0
    if name == "typ_p":
        return p.typical_p >= 1.0
    if name == "top_p":
        return p.top_p >= 1.0
    if name == "min_p":
        return p.min_p <= 0.0
    if name == "xtc":
        return p.xtc_probability <= 0.0 or p.xtc_threshold > 0.5
    if name == "adaptive_p":
        return False  # it replaces dist: it always picks
    return False  # temperature and infill always act


def _keeps_order(name: str, p: SamplingParams) -> bool:
    """Off, or a plain temperature: the candidates keep their order of logits (temperature <= 0
    leaves only the highest one)."""
    return is_off(name, p) or (name == "temperature" and p.dynatemp_range <= 0.0)


def argmax_exact(p: SamplingParams) -> bool:
    """The chain always picks the highest (biased) logit: temperature <= 0 is in the chain and
    every other sampler that acts only narrows the candidates without dropping the top one
    (top_k, top_p, min_p, top_n_sigma). Penalties, DRY, XTC, typical-p, infill, adaptive-p and
    mirostat can pick something else, so they turn this off."""
    if p.mirostat or p.temperature > 0.0 or "temperature" not in p.samplers:
        return False
    keeps_top = {"temperature", "top_k", "top_p", "min_p", "top_n_sigma"}
    return all(n in keeps_top or is_off(n, p) for n in p.samplers)


def top_k_first(p: SamplingParams) -> int:
    """k when the chain's first sampler to change the candidates is top_k (k > 0): the chain
    then only ever sees the k highest (biased) logits, and running it over any superset of them
    picks the same. 0 when not (mirostat, no top_k, or a sampler before it that acts on the
    whole row: penalties, DRY, top-n-sigma, top-p, ...)."""
    if p.mirostat or p.top_k <= 0 or "top_k" not in p.samplers:
        return 0
    before = p.samplers[:p.samplers.index("top_k")]
    return p.top_k if all(_keeps_order(n, p) for n in before if n != "adaptive_p") else 0


def suppress_tokens(vocab) -> list[int]:
    """The model's suppress tokens (gguf tokenizer.ggml.suppress_tokens), banned as upstream."""
    if vocab is None:
        return []
    n = ctypes.c_int32(0)
    ptr = lib().llama_vocab_get_suppress_tokens(getattr(vocab, "ptr", vocab), ctypes.byref(n))
    return [int(ptr[i]) for i in range(n.value)] if ptr and n.value > 0 else []


def merged_bias(p: SamplingParams, vocab=None) -> dict[int, float]:
    """The logit bias the chain applies: the request's, and -inf on the suppress tokens."""
    return {**p.logit_bias, **dict.fromkeys(suppress_tokens(vocab), float("-inf"))}


def chain_samplers(p: SamplingParams, n_vocab: int, vocab=None) -> list[int]:
    """The samplers of the chain, in order (the caller adds them to a chain, which owns them).
    RuntimeError if llama.cpp refuses one; the ones made so far are freed first."""
    L = lib()
    out: list[int] = []
    vptr = getattr(vocab, "ptr", vocab)
    seed = B.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF

    def add(smpl: int | None, what: str) -> None:
        if not smpl:
            for s in out:
                L.llama_sampler_free(s)
            raise RuntimeError(f"could not create the {what} sampler (check its parameters)")
        out.append(smpl)

    bias = merged_bias(p, vocab)
    if bias:
        arr = (B.llama_logit_bias * len(bias))()
        for i, (tok, b) in enumerate(bias.items()):
            arr[i].token, arr[i].bias = int(tok), float(b)
        add(L.llama_sampler_init_logit_bias(n_vocab, len(bias), arr), "logit_bias")
    if p.mirostat:
        add(L.llama_sampler_init_temp(p.temperature), "temperature")
        if p.mirostat == 1:
            add(L.llama_sampler_init_mirostat(n_vocab, seed, p.mirostat_tau, p.mirostat_eta, 100), "mirostat")
        else:
            add(L.llama_sampler_init_mirostat_v2(seed, p.mirostat_tau, p.mirostat_eta), "mirostat_v2")
        return out
    keep = p.min_keep
    for name in p.samplers:
        if name == "penalties":
            add(L.llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty,
                                               p.frequency_penalty, p.presence_penalty), name)
        elif name == "dry":
            if vptr is None and not is_off(name, p):  # (when off, llama.cpp never reads it)
                raise ValueError("DRY needs the vocabulary")
            brk = [b.encode("utf-8") for b in p.dry_sequence_breakers]
            arr = (ctypes.c_char_p * max(1, len(brk)))(*brk)
            add(L.llama_sampler_init_dry(vptr, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
                                         p.dry_penalty_last_n, arr, len(brk)), name)
        elif name == "top_n_sigma":
            add(L.llama_sampler_init_top_n_sigma(p.top_n_sigma), name)
        elif name == "top_k":
            add(L.llama_sampler_init_top_k(p.top_k), name)
        elif name == "typ_p":
            add(L.llama_sampler_init_typical(p.typical_p, keep), name)
        elif name == "top_p":
            add(L.llama_sampler_init_top_p(p.top_p, keep), name)
        elif name == "min_p":
            add(L.llama_sampler_init_min_p(p.min_p, keep), name)
        elif name == "xtc":
            add(L.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, keep, seed), name)
        elif name == "temperature":
            add(L.llama_sampler_init_temp_ext(p.temperature, p.dynatemp_range, p.dynatemp_exponent), name)
        elif name == "infill":
            if vptr is None:
                raise ValueError("infill needs the vocabulary")
            add(L.llama_sampler_init_infill(vptr), name)
        # adaptive_p: added last, in dist's place
    if "adaptive_p" in p.samplers:
        add(L.llama_sampler_init_adaptive_p(p.adaptive_target, p.adaptive_decay, seed), "adaptive_p")
    else:
        add(L.llama_sampler_init_dist(seed), "dist")
    return out
