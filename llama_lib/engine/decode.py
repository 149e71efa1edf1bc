"""The decode phase of a step: the batch in chunks of n_batch, halving a chunk and retrying
when the KV cache has no room (llama.cpp's parallel loop), and sampling every slot whose logits
a decoded chunk holds: stop rules, streaming, release. It works on the engine's parts
(parts.py) and returns the requests that ended.
"""

from __future__ import annotations

import logging
import time

from ..context import DECODE_NO_KV_SLOT
from .ctx_shift import settle
from .output import take_token
from .parts import StepParts
from .lifecycle import release
from .request import Request
from .seq_order import arrange, drop_fillers, remove_fillers
from .slot import GENERATE, PREFILL, repoint_rows
from .spec_verify import verify
from .types import FinishReason

log = logging.getLogger("llama_lib.engine")


def decode_and_sample(p: StepParts) -> list[Request]:
    """Decode the batch in chunks of n_batch, halving on a full KV cache; sample as we go.
    Returns the requests that ended (their slots are released already)."""
    ended: list[Request] = []
    fillers = arrange(p)  # fewest ubatches with a KV stream per slot (seq_order.py)
    try:
        _decode_chunks(p, fillers, ended)
    finally:
        remove_fillers(p, fillers)
        if p.spec is not None:
            p.spec.after_decode(p)
    return ended


def _decode_chunks(p: StepParts, fillers: list[tuple[int, int]], ended: list[Request]) -> None:
    batch, ctx, st = p.batch, p.ctx, p.stats
    n_batch = p.n_batch
    # prefilling slots whose requests asked for prompt progress (return_progress); mostly none
    reporting = [s for s in p.slots if s.phase is PREFILL and s.req.params.return_progress]
    i = 0
    while i < batch.n_tokens:
        n = min(n_batch, batch.n_tokens - i)
        ret = ctx.decode(batch.view(i, n))
        if ret == DECODE_NO_KV_SLOT:
            st.n_cache_misses += 1
            if drop_fillers(p, fillers, i):  # optional rows go first; an eviction might empty their slot
                continue
            if p.cache.evict():
                continue
            if n > 1:
                n_batch = max(1, n // 2)
                log.warning("no KV room for %d tokens, retrying with n_batch = %d", n, n_batch)
                continue
            _fail_token_owner(p, i, ended)
            continue
        if reporting:
            _report_progress(p, reporting, i, i + n)
        _sample_range(p, i, i + n, ended)
        i += n
        n_batch = p.n_batch


def _report_progress(p: StepParts, slots: list, lo: int, hi: int) -> None:
    """Tell each request in `slots` with prompt rows in [lo, hi) of the batch just decoded how
    far its prompt is in the KV cache (its last row's position, as a prompt index)."""
    seq_ids, pos = p.batch.seq_id[lo:hi, 0], p.batch.pos[lo:hi]
    for s in slots:
        if s.req is None:
            continue
        rows = seq_ids == s.seq_id
        if rows.any():  # positions n_past - prompt_pos ... hold prompt tokens 0 ...
            s.req._progress(int(pos[rows].max()) + 1 - (s.n_past - s.prompt_pos))


def _fail_token_owner(p: StepParts, i: int, ended: list[Request]) -> None:
    """Not even one token fits: fail the request that owns batch row i and drop its rows."""
    batch = p.batch
    seq = int(batch.seq_id[i, 0])
    slot = p.slots[seq - 1]
    log.error("KV cache full: request %s in slot %d fails (raise -c/--ctx-size)",
              slot.req.id if slot.req else "?", slot.id)
    r = release(slot, FinishReason.ERROR,
                "the KV cache is full: no room to continue this request (context size too small)",
                p.cache, p.stats)
    if r is not None:
        ended.append(r)
    # Remove that sequence's remaining rows and re-point the other slots' logits rows.
    repoint_rows(p.slots, batch.remove_sequence(seq, i), i)


def _sample_range(p: StepParts, lo: int, hi: int, ended: list[Request]) -> None:
    """Sample for every slot whose logits row is in [lo, hi) of the batch just decoded."""
    st = p.stats
    vocab = p.vocab
    ctx = p.ctx
    for s in p.slots:
        ib = s.i_batch
        if ib < lo or ib >= hi or s.req is None:
            continue
        if p.spec is not None and verify(p.spec, p, s, lo, hi, ended):
            continue  # the slot had a draft (spec_verify.py)
        s.i_batch = -1
        r = s.req
        t0 = time.perf_counter()
        tok = s.sampler.sample(ctx, ib - lo)
        now = time.perf_counter()
        st.t_sample += now - t0
        st.n_generated_tokens += 1
        if s.phase is PREFILL:
            r.timings.prompt_done = now
            s.phase = GENERATE
        s.sampled = tok
        reason = take_token(r, s.matcher, tok, vocab, ctx, ib - lo, st, s.sampler)
        settle(p, s, reason, ended)  # a full slot shifts or ends (ctx_shift.py); an end releases
