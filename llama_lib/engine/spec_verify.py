"""Verifying a slot's draft after the decode (speculative.py put it in the batch): the slot's
own sampler chain samples at its last token's row and at each draft row in turn (grammar,
penalties, logit bias and all), and goes on while what it samples is the draft's next token.
Every sampled token is the request's, exactly as without a draft: greedy output is the same
token for token, sampled output follows the target model's distribution. Each token goes
through `take_token` (stop strings, n_predict, EOS; one streamed chunk each); the KV cells of
the draft tokens that were not kept are removed.
"""

from __future__ import annotations

import time

from .ctx_shift import settle
from .output import take_token
from .parts import StepParts
from .request import Request
from .slot import Slot
from .speculative import DECAY, Speculator


def verify(spec: Speculator, p: StepParts, s: Slot, lo: int, hi: int, ended: list[Request]) -> bool:
    """Sample slot s over its rows [i_batch, i_batch + len(draft)] of the chunk [lo, hi) just
    decoded, if it has a draft; returns False (nothing done) when it has none."""
    st = spec.slots[s.id]
    d = st.draft
    if d is None:
        return False
    st.draft = None
    ib, s.i_batch = s.i_batch, -1
    k = len(d)
    base = s.n_past - 1 - k          # the position of the slot's last token (row ib)
    kk = min(k, hi - 1 - ib)         # draft rows in this chunk (the rest: rejected)
    r, ctx, stats, vocab = s.req, p.ctx, p.stats, p.vocab
    reason = None
    m = 0
    missed = kk < k
    t0 = time.perf_counter()
    for j in range(kk + 1):
        row = ib + j - lo
        tok = s.sampler.sample(ctx, row)
        m += 1
        s.sampled = tok
        reason = take_token(r, s.matcher, tok, vocab, ctx, row, stats, s.sampler)
        if reason is not None or j == kk:
            break
        if tok != int(d[j]):
            missed = True
            break
    stats.t_sample += time.perf_counter() - t0
    stats.n_generated_tokens += m
    accepted = m - 1
    stats.n_draft_tokens += k
    stats.n_draft_accepted += accepted
    stats.n_drafts += 1
    r.timings.draft_n += k
    r.timings.draft_n_accepted += accepted
    st.n_drafted += k
    st.n_accepted += accepted
    if reason is None:  # a stop cut the draft short: that says nothing of its quality
        st.hits = st.hits * DECAY + accepted
        st.misses = st.misses * DECAY + (1.0 if missed else 0.0)
    if missed:  # the optimism that made it draft was wrong: its own figures decide again
        st.skipped = 0
    # rows ib .. ib + m - 1 hold tokens the request keeps; the last sampled is decoded next step
    s.n_past = base + m
    if m <= k:
        p.memory.seq_rm(s.seq_id, s.n_past, -1)
        if kk < k:  # rows of a later chunk: they land after this
            spec.stale_after(s.seq_id, s.n_past)
    settle(p, s, reason, ended)
    return True
