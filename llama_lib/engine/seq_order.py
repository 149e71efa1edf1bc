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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .slot import IDLE, repoint_rows

if TYPE_CHECKING:
    from .core import Engine

FILLER_TOKEN = 0  # any valid id: its cell is removed before anything reads it


def arrange(e: "Engine") -> list[tuple[int, int]]:
    """Fill the gaps and sort the batch (slots' logits rows follow). Returns the fillers as
    (sequence id, position), for `remove_fillers` once the decode is done."""
    if e.batch.n_tokens == 0 or e.cache.kv_unified or not e.config.pack_sequences:
        return []  # (one stream: llama.cpp splits simply, in any order)
    if already_packed(e.batch.seq_id[:e.batch.n_tokens, 0]):
        return []  # the usual case (one sequence, or busy slots side by side): nothing to move
    fillers = fill_gaps(e)
    sort_rows(e)
    return fillers


def already_packed(seqs: np.ndarray) -> bool:
    """Sorted, with no missing id between the lowest and the highest: one ubatch as it is."""
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
    left = [f for f in fillers if (batch.seq_id[start:n, 0] == f[0]).any()]
    for f in left:
        repoint_rows(e.slots, batch.remove_sequence(f[0], start), start)
        fillers.remove(f)
    return bool(left)
