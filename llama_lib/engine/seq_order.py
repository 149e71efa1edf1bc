"""A step's batch laid out so that llama.cpp splits it into as few ubatches as it can.

With a KV stream per sequence (the default layout, not -kvu), llama_decode must split a batch
"equally" (llama-batch.cpp split_equal, sequential): each ubatch covers a run of consecutive
sequence ids, found in the order the batch lists them, and every ubatch is one more pass over
all the weights. Generating slots 1, 2, 4, 5, 7 made three passes instead of one (58 ms
against 45 for the same five tokens, measured here), and a batch listing slot 3's token before
slot 1's prompt split again. So before each decode:

- the batch's rows are put in order of sequence id (stably: a prompt's tokens stay in order);
- an idle slot that sits in a gap between the sequences of the batch gets one throw-away token
  at the end of its cache (no logits), removed again after the decode, so the run of ids has
  no hole. Its cached tokens stay as they were: a filler is only placed where the cache is
  shorter than the sliding window (nothing older can be dropped to make room for it) and the
  slot has a cell to spare.
- the equal split also takes the same number of rows from every sequence of a ubatch, so
  prompts of 12 to 16 tokens in one step made five passes where one would do (a wave of eight
  new requests). When that is cheaper (`decode_cost`), the shorter prompts get throw-away tokens
  after their last one, up to the longest: causal attention keeps the real tokens from seeing
  them, only real rows ask for logits, and their cells are removed after the decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .slot import IDLE, PREFILL, repoint_rows

if TYPE_CHECKING:
    from .core import Engine

FILLER_TOKEN = 0  # any valid id: its cell is removed before anything reads it
# What a ubatch costs, in tokens: a fixed part for the pass over the weights, a part for each
# sequence (its KV stream), then each token. Fitted to decodes of the default model here
# (native and prebuilt builds alike): 1 sequence x 1 token 13 ms, x 64 tokens 105 ms, 8 x 1
# 42 ms, 8 x 14 182 ms; 8 prompts of 12-16 tokens 246 ms as they are, 205 ms padded to 16.
PASS_COST = 6.0
SEQUENCE_COST = 2.0


def arrange(e: "Engine") -> list[tuple[int, int]]:
    """Fill the gaps and sort the batch (slots' logits rows follow). Returns the fillers as
    (sequence id, position), for `remove_fillers` once the decode is done."""
    if e.batch.n_tokens == 0 or e.cache.kv_unified or not e.config.pack_sequences:
        return []  # (one stream: llama.cpp splits simply, in any order)
    fillers: list[tuple[int, int]] = []
    if not already_packed(e.batch.seq_id[:e.batch.n_tokens, 0]):  # (usually packed: nothing to move)
        fillers = fill_gaps(e)
        sort_rows(e)
    if any(s.phase is PREFILL for s in e.slots):  # only a prompt has more than one row
        padding = even_out_rows(e)
        if padding:
            sort_rows(e)
            fillers += padding
    return fillers


def already_packed(seqs: np.ndarray) -> bool:
    """Sorted, with no missing id between the lowest and the highest: nothing to sort or fill."""
    if len(seqs) < 2:
        return True
    step = np.diff(seqs)
    return bool(((step == 0) | (step == 1)).all())


def fill_gaps(e: "Engine") -> list[tuple[int, int]]:
    """A filler token for each idle slot between the batch's lowest and highest sequence id
    whose cache can take one without losing anything."""
    batch = e.batch
    present = np.unique(batch.seq_id[:batch.n_tokens, 0])
    n_swa = e.cache.n_swa
    fillers: list[tuple[int, int]] = []
    for sid in range(int(present[0]) + 1, int(present[-1])):
        if sid in present or not 1 <= sid <= len(e.slots) or batch.n_tokens >= batch.capacity:
            continue
        s = e.slots[sid - 1]
        if s.req is not None or s.phase is not IDLE:
            continue
        end = e.memory.seq_pos_max(sid) + 1
        if end + 1 > e.n_ctx_slot or (n_swa > 0 and end + 1 > n_swa):
            continue
        batch.add(FILLER_TOKEN, end, sid, False)
        fillers.append((sid, end))
    return fillers


def ubatch_shapes(ids: np.ndarray, counts: np.ndarray, n_ubatch: int) -> list[tuple[int, int]]:
    """The ubatches (sequences, rows from each) that llama.cpp's sequential equal split makes of
    a batch sorted by sequence id (`ids`, each with `counts` rows): a ubatch takes the run of
    consecutive ids that starts at the first sequence with rows left, and as many rows from
    each as the fewest left (at most n_ubatch in all)."""
    left = [int(c) for c in counts]
    ids = [int(i) for i in ids]
    shapes: list[tuple[int, int]] = []
    first = 0
    while first < len(left):
        if left[first] == 0:
            first += 1
            continue
        end = first + 1
        while end < len(left) and left[end] > 0 and ids[end] == ids[end - 1] + 1:
            end += 1
        n = end - first
        width = min(min(left[first:end]), max(1, n_ubatch // n))
        for k in range(first, end):
            left[k] -= width
        shapes.append((n, width))
    return shapes


def decode_cost(shapes: list[tuple[int, int]]) -> float:
    """Estimated time of a decode split into these ubatches, in tokens (PASS_COST)."""
    return sum(PASS_COST + SEQUENCE_COST * n + n * width for n, width in shapes)


def even_out_rows(e: "Engine") -> list[tuple[int, int]]:
    """Throw-away rows after the shorter sequences of the step, up to the longest one's count,
    when the fewer passes are worth the extra tokens; the prompts' rows only, or every
    sequence's, whichever costs least. Returns the fillers as (sequence id, first position)."""
    batch = e.batch
    n = batch.n_tokens
    seqs, pos = batch.seq_id[:n, 0], batch.pos[:n]
    ids, counts = np.unique(seqs, return_counts=True)
    width = int(counts.max())
    if width == 1 or n > e.n_batch:  # nothing uneven, or several decode calls anyway
        return []
    n_swa, n_ubatch = e.cache.n_swa, e.ctx.n_ubatch
    room = min(batch.capacity, e.n_batch) - n

    def cost(c) -> float:
        return decode_cost(ubatch_shapes(ids, c, n_ubatch))

    ends = {int(sid): int(pos[seqs == sid].max()) + 1 for sid in ids[counts < width]}
    fits = np.array([c == width or ends[int(sid)] + width - c <= min(e.n_ctx_slot, n_swa or e.n_ctx_slot)
                     for sid, c in zip(ids, counts)])
    best, best_cost = counts, cost(counts)
    for pad in (counts > 1, counts >= 1):  # the prompts; every sequence
        c = np.where(pad & fits, width, counts)
        if int((c - counts).sum()) <= room and cost(c) < best_cost:
            best, best_cost = c, cost(c)
    fillers = []
    for sid, c, b in zip(ids, counts, best):
        if b > c:
            start = ends[int(sid)]
            for p in range(start, start + int(b - c)):
                batch.add(FILLER_TOKEN, p, int(sid), False)
            fillers.append((int(sid), start))
    return fillers


def sort_rows(e: "Engine") -> None:
    """Rows in order of sequence id, each sequence's rows in their order; logits rows follow."""
    batch = e.batch
    order = np.argsort(batch.seq_id[:batch.n_tokens, 0], kind="stable")
    if (order != np.arange(len(order))).any():
        repoint_rows(e.slots, batch.permute(order))


def remove_fillers(e: "Engine", fillers: list[tuple[int, int]]) -> None:
    for sid, pos in fillers:
        e.memory.seq_rm(sid, pos, -1)


def drop_fillers(e: "Engine", fillers: list[tuple[int, int]], start: int) -> bool:
    """Take the fillers not yet decoded (rows from `start` on) out of the batch, e.g. before a
    retry on a full KV cache. Returns whether there were any."""
    batch = e.batch
    n = batch.n_tokens
    left = [f for f in fillers if ((batch.seq_id[start:n, 0] == f[0]) & (batch.pos[start:n] >= f[1])).any()]
    for sid, pos in left:
        repoint_rows(e.slots, batch.remove_sequence(sid, start, from_pos=pos), start)
        fillers.remove((sid, pos))
    return bool(left)
