"""A request's start and end in a slot.

`start_request`: the prompt cache prepares the slot's sequence (or the request waits for a
shared prefix), then the slot gets its sampler and stop matcher. `release`: the last held-back
text, the sequence kept as a prompt cache or reset, the engine's counters, the handle's end;
called by the decode phase (a request that finished or could not go on) and by the engine
(cancelled, failed to start).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from ..sampler import Sampler
from .controls import LineControls
from .output import StopMatcher
from .parts import StepParts
from .prompt_cache import PrefixCache
from .request import Request
from .slot import WAIT, Slot
from .types import EngineStats, FinishReason

log = logging.getLogger("llama_lib.engine")

_FLUSHED_REASONS = (FinishReason.EOS, FinishReason.LENGTH)


def start_request(p: StepParts, s: Slot, r: Request, slot_id_base: int) -> bool:
    """Put a request in its reserved slot, reusing what the prompt cache holds of its prompt.
    False when it waits for another slot's prefill instead (prefix_share.ready_followers)."""
    n_keep = p.cache.claim(s, r)
    if n_keep is None:
        return False
    r.slot_id = s.id + slot_id_base
    r.n_cached_tokens = s.n_prefix + n_keep
    r.n_prompt_tokens = len(r.prompt_tokens) - n_keep
    p.stats.n_prompt_tokens_cached += n_keep
    r.timings.started = time.perf_counter()
    sampling = r.params.sampling
    if sampling.repeat_last_n == -1:  # llama.cpp's "the whole context"
        sampling = dataclasses.replace(sampling, repeat_last_n=p.n_ctx_slot)
    post = r.params.n_probs > 0 and r.params.post_sampling_probs
    sampler = Sampler(sampling, p.vocab.n_tokens, p.vocab, keep_candidates=post)
    sampler.prime(r.prompt_tokens)  # penalties and DRY see the prompt, as in llama-server
    r.controls = LineControls.for_params(r.params)
    s.begin(r, s.n_prefix + n_keep, n_keep, sampler, StopMatcher(r.params.stop))
    return True


def start_requests(p: StepParts, chosen: list[tuple[Slot, Request]], slot_id_base: int) -> list[Request]:
    """Start each request in the slot reserved for it; returns those that failed to start
    (their slots released)."""
    failed = []
    for s, r in chosen:
        try:
            start_request(p, s, r, slot_id_base)
        except Exception as e:
            log.exception("request %d could not start", r.id)
            release(s, FinishReason.ERROR, f"internal error: {e}", p.cache, p.stats)
            failed.append(r)
    if chosen and p.config.cache_idle_slots:
        p.cache.cache_idle_slots()
    return failed


def release(s: Slot, reason: FinishReason, error: str | None, cache: PrefixCache,
            stats: EngineStats) -> Request | None:
    """Finish the slot's request; returns it (None when the slot had none). A finished request's
    tokens stay in the slot's KV as a prompt cache; a cancelled or failed one's cells are freed
    (back to the system prompt). The caller drops the request from the engine's unfinished set."""
    r = s.req
    if r is None:
        return None
    if reason in _FLUSHED_REASONS and s.matcher is not None:
        r._emit(s.matcher.flush(), [])
    waited = s.phase is WAIT  # never started: the sequence still holds the slot's cache
    s.end(time.perf_counter())
    if not waited:
        cache.cache_finished(s, r, reason)
    if reason == FinishReason.CANCELLED:
        stats.n_requests_cancelled += 1
    elif reason == FinishReason.ERROR:
        stats.n_requests_failed += 1
    else:
        stats.n_requests_done += 1
    r._finish(reason, error)
    return r


def end_waiting(r: Request, stats: EngineStats) -> None:
    """End a request cancelled (or failed by its callback) before it had a slot."""
    reason, error = r.cancel_reason
    if reason == FinishReason.ERROR:
        stats.n_requests_failed += 1
    else:
        stats.n_requests_cancelled += 1
    r._finish(reason, error)
