"""A step's batch laid out so that llama.cpp splits it into as few ubatches as it can.

With a KV stream per sequence (the default layout, not -kvu), llama_decode must split a batch
"equally" (llama-batch.cpp split_equal, sequential): each ubatch covers a run of consecutive
sequence ids, found in the order the batch lists them, and every ubatch is one more pass over
all the weights. Generating slots 1, 2, 4, 5, 7 made three passes instead of one (58 ms
against 45 for the same five tokens, measured here), and a batch listing slot 3's token before
slot 1's prompt split again. So before each decode:

- the batch's rows are put in order of sequence id (stably: a prompt's tokens stay in order);
- an idle slot that sits in a gap between the sequences of the batch may get one throw-away
  token at the end of its cache (no logits), removed again after the decode, so the run of
  ids has no hole. Its cached tokens stay as they were: a filler is only placed where the
  cache is shorter than the sliding window (nothing older can be dropped to make room for
  it) and the slot has a cell to spare.
- the equal split also takes the same number of rows from every sequence of a ubatch, so
  prompts of 12 to 16 tokens in one step made seven passes where one would do (a wave of
  eight new requests). The shorter ones may get throw-away tokens after their last one, up
  to the longest: causal attention keeps the real tokens from seeing them, only real rows
  ask for logits, and their cells are removed after the decode.

Which fillers a step gets is the layout `decode_cost` prices cheapest (`cheapest_layout`):
a gap filler helps a step of generated tokens, but two prompts around an idle slot are
cheaper without one.
"""

from __future__ import annotations

import numpy as np

from .parts import StepParts
from .slot import IDLE, PREFILL, repoint_rows

FILLER_TOKEN = 0  # any valid id: its cell is removed before anything reads it
# What a ubatch costs, in tokens: a fixed part for the pass over the weights, a part for each
# sequence (its KV stream), then each token. Fitted to decodes of the default model here
# (native and prebuilt builds alike): 1 sequence x 1 token 13 ms, x 64 tokens 105 ms, 8 x 1
# 42 ms, 8 x 14 182 ms; 8 prompts of 12-16 tokens 246 ms as they are, 205 ms padded to 16.
PASS_COST = 6.0
SEQUENCE_COST = 2.0


def arrange(p: StepParts) -> list[tuple[int, int]]:
    """Sort the batch, and add the throw-away rows (gap fillers, padding) of the layout that
    `decode_cost` finds cheapest; slots' logits rows follow. Returns the fillers as (sequence
    id, first position), for `remove_fillers` once the decode is done."""
    batch = p.batch
    n = batch.n_tokens
    if n == 0 or p.cache.kv_unified or not p.config.pack_sequences:
        return []  # (one stream: llama.cpp splits simply, in any order)
    seqs, pos = batch.seq_id[:n, 0], batch.pos[:n]
    prompts = any(s.phase is PREFILL for s in p.slots)  # a prompt or a draft has more than one row
    if not prompts and already_packed(seqs) and int(seqs[-1] - seqs[0]) + 1 == n:
        return []  # the usual step: busy slots side by side, one row each
    present, rows = np.unique(seqs, return_counts=True)
    ends = {int(sid): int(pos[seqs == sid].max()) + 1 for sid in present}  # where fillers go
    ends.update(fillable_gaps(p, present))
    ids = np.array(sorted(ends), dtype=np.int64)
    counts = np.zeros(len(ids), dtype=np.int64)
    counts[np.searchsorted(ids, present)] = rows
    target = cheapest_layout(p, ids, counts, np.array([ends[sid] for sid in ids.tolist()]))
    fillers = []
    for sid, have, want in zip(ids.tolist(), counts.tolist(), target.tolist()):
        if want > have:
            start = ends[sid]
            for pos_f in range(start, start + want - have):
                batch.add(FILLER_TOKEN, pos_f, sid, False)
            fillers.append((sid, start))
    sort_rows(p)
    return fillers


def already_packed(seqs: np.ndarray) -> bool:
    """Sorted, with no missing id between the lowest and the highest: nothing to sort or fill."""
    if len(seqs) < 2:
        return True
    step = np.diff(seqs)
    return bool(((step == 0) | (step == 1)).all())


def fillable_gaps(p: StepParts, present: np.ndarray) -> dict[int, int]:
    """The idle slots between the batch's lowest and highest sequence id whose cache can take a
    throw-away token without losing anything: sequence id -> where their cache ends."""
    n_swa = p.cache.n_swa
    gaps: dict[int, int] = {}
    for sid in range(int(present[0]) + 1, int(present[-1])):
        if sid in present or not 1 <= sid <= len(p.slots):
            continue
        s = p.slots[sid - 1]
        if s.req is not None or s.phase is not IDLE:
            continue
        end = p.memory.seq_pos_max(sid) + 1
        if end + 1 > p.n_ctx_slot or (n_swa > 0 and end + 1 > n_swa):
            continue
        gaps[sid] = end
    return gaps


def cheapest_layout(p: StepParts, ids: np.ndarray, counts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Rows each sequence gets (its own plus fillers), the cheapest of: the gaps (count 0 here)
    left alone or given one row each; and then nothing padded, the prompts padded to the
    longest, or every sequence padded to it. A filler never takes a sequence past its context
    or its sliding window; padding never takes the batch past n_batch (one decode call), and
    a batch that needs several gets gap fillers only."""
    width = int(counts.max())
    limit = min(p.n_ctx_slot, p.cache.n_swa or p.n_ctx_slot)
    n = int(counts.sum())
    padding = n <= p.n_batch
    room = (min(p.batch.capacity, p.n_batch) if padding else p.batch.capacity) - n
    n_ubatch = p.ctx.n_ubatch
    gap = counts == 0
    best, best_cost = counts, float("inf")  # (the first option is the batch as it is)
    for base in ((counts, np.where(gap, 1, counts)) if gap.any() else (counts,)):
        options = [base]
        if padding and width > 1:
            fits = ends + (width - counts) <= limit
            options += [np.where((counts > 1) & fits, width, base),
                        np.where((base > 0) & fits, width, base)]
        for c in options:
            if int((c - counts).sum()) > room:
                continue
            cost = decode_cost(ubatch_shapes(ids, c, n_ubatch))
            if cost < best_cost:
                best, best_cost = c, cost
    return best


def ubatch_shapes(ids: np.ndarray, counts: np.ndarray, n_ubatch: int) -> list[tuple[int, int]]:
    """The ubatches (sequences, rows from each) that llama.cpp's sequential equal split makes of
    a batch sorted by sequence id (`ids`, each with `counts` rows; 0: not in the batch): a
    ubatch takes the run of consecutive ids that starts at the first sequence with rows left,
    and as many rows from each as the fewest left (at most n_ubatch in all)."""
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


def padded_cost(ids: list[int], counts: list[int], pad_ok: list[bool], n_ubatch: int) -> tuple[float, int]:
    """The cheapest layout `cheapest_layout` would give a batch of generated tokens and drafts:
    sequences `ids` (sorted) with `counts` rows each, as they are, the ones with several rows
    padded to the widest, or all padded (`pad_ok`: the sequence may take fillers). Returns its
    decode_cost less the rows (what its passes cost) and its rows, fillers included. Pure
    Python: the speculator prices many candidate draft lengths a step."""
    width = max(counts)
    best = None
    seen: list[list[int]] = []
    for pad, wide_only in ((False, False), (True, True), (True, False)):
        c = [width if pad and ok and (c > 1 or not wide_only) else c for c, ok in zip(counts, pad_ok)]
        if c in seen:
            continue
        seen.append(c)
        shapes = ubatch_shapes(ids, c, n_ubatch)
        rows = sum(n * w for n, w in shapes)
        over = decode_cost(shapes) - rows
        if best is None or over + rows < best[0] + best[1]:
            best = (over, rows)
    return best


def decode_cost(shapes: list[tuple[int, int]]) -> float:
    """Estimated time of a decode split into these ubatches, in tokens (PASS_COST)."""
    return sum(PASS_COST + SEQUENCE_COST * n + n * width for n, width in shapes)


def sort_rows(p: StepParts) -> None:
    """Rows in order of sequence id, each sequence's rows in their order; logits rows follow."""
    batch = p.batch
    order = np.argsort(batch.seq_id[:batch.n_tokens, 0], kind="stable")
    if (order != np.arange(len(order))).any():
        repoint_rows(p.slots, batch.permute(order))


def remove_fillers(p: StepParts, fillers: list[tuple[int, int]]) -> None:
    for sid, pos in fillers:
        p.memory.seq_rm(sid, pos, -1)


def drop_fillers(p: StepParts, fillers: list[tuple[int, int]], start: int) -> bool:
    """Take the fillers not yet decoded (rows from `start` on) out of the batch, p.g. before a
    retry on a full KV cache. Returns whether there were any."""
    batch = p.batch
    n = batch.n_tokens
    left = [f for f in fillers if ((batch.seq_id[start:n, 0] == f[0]) & (batch.pos[start:n] >= f[1])).any()]
    for sid, pos in left:
        repoint_rows(p.slots, batch.remove_sequence(sid, start, from_pos=pos), start)
        fillers.remove((sid, pos))
    return bool(left)
