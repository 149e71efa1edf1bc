"""The decode phase of a step: the batch in chunks of n_batch, halving a chunk and retrying
when the KV cache has no room (llama.cpp's parallel loop), and sampling every slot whose logits
a decoded chunk holds: stop rules, streaming, release."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..context import DECODE_NO_KV_SLOT
from .output import take_token
from .seq_order import arrange, drop_fillers, remove_fillers
from .slot import GENERATE, PREFILL, repoint_rows
from .types import FinishReason

if TYPE_CHECKING:
    from .core import Engine

log = logging.getLogger("llama_lib.engine")


def decode_and_sample(e: "Engine") -> None:
    """Decode the batch in chunks of n_batch, halving on a full KV cache; sample as we go."""
    batch, ctx, st = e.batch, e.ctx, e.stats
    fillers = arrange(e)  # fewest ubatches with a KV stream per slot (seq_order.py)
    try:
        _decode_chunks(e, batch, ctx, st, fillers)
    finally:
        remove_fillers(e, fillers)


def _decode_chunks(e: "Engine", batch, ctx, st, fillers: list[tuple[int, int]]) -> None:
    n_batch = e.n_batch
    i = 0
    while i < batch.n_tokens:
        n = min(n_batch, batch.n_tokens - i)
        ret = ctx.decode(batch.view(i, n))
        if ret == DECODE_NO_KV_SLOT:
            st.n_cache_misses += 1
            if drop_fillers(e, fillers, i):  # optional rows go first; an eviction might empty their slot
                continue
            if e.cache.evict():
                continue
            if n > 1:
                n_batch = max(1, n // 2)
                log.warning("no KV room for %d tokens, retrying with n_batch = %d", n, n_batch)
                continue
            _fail_token_owner(e, i)
            continue
        _sample_range(e, i, i + n)
        i += n
        n_batch = e.n_batch

def _fail_token_owner(e: "Engine", i: int) -> None:
    """Not even one token fits: fail the request that owns batch row i and drop its rows."""
    batch = e.batch
    seq = int(batch.seq_id[i, 0])
    slot = e.slots[seq - 1]
    log.error("KV cache full: request %s in slot %d fails (raise -c/--ctx-size)",
              slot.req.id if slot.req else "?", slot.id)
    e._release(slot, FinishReason.ERROR,
                  "the KV cache is full: no room to continue this request (context size too small)")
    # Remove that sequence's remaining rows and re-point the other slots' logits rows.
    repoint_rows(e.slots, batch.remove_sequence(seq, i), i)

def _sample_range(e: "Engine", lo: int, hi: int) -> None:
    """Sample for every slot whose logits row is in [lo, hi) of the batch just decoded."""
    st = e.stats
    vocab = e.vocab
    for s in e.slots:
        ib = s.i_batch
        if ib < lo or ib >= hi or s.req is None:
            continue
        s.i_batch = -1
        r = s.req
        t0 = time.perf_counter()
        tok = s.sampler.sample(e.ctx, ib - lo)
        now = time.perf_counter()
        st.t_sample += now - t0
        st.n_generated_tokens += 1
        if s.phase is PREFILL:
            r.timings.prompt_done = now
            s.phase = GENERATE
        s.sampled = tok
        reason = take_token(r, s.matcher, tok, vocab, e.ctx, ib - lo, st)
        if reason is None and s.n_past >= e.n_ctx_slot:  # no position left for the next token
            reason = FinishReason.LENGTH
        if reason is not None:
            e._release(s, reason)
