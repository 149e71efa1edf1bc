"""draft-simple: a small draft model guesses the next tokens (llama.cpp's
common_speculative_impl_draft_simple), for every drafting slot at once.

The draft model has a context of its own, used only by the engine's thread, with a KV
sequence per slot (the slot's own sequence id). Each step `draft_many`:
1. brings each drafting slot's draft sequence up to its history (prompt and generated tokens,
   all but the last sampled one): the tokens it already holds that still match are kept, the
   rest removed, the missing ones decoded (no logits), all slots in one batch;
2. decodes each slot's last sampled token, then its own greedy guesses one at a time, all
   slots in one batch per position, until a slot has its length or its guess's probability is
   under p_min.
Its drafts go to the target model's verification like any other (spec_verify.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from ..batch import Batch
from ..context import Context
from ..model import Model
from .slot import Slot

log = logging.getLogger("llama_lib.engine")


def check_vocab(target: Model, draft: Model) -> None:
    """A draft must share the target's vocabulary (llama.cpp checks its type, size and pieces)."""
    tv, dv = target.vocab, draft.vocab
    if tv.n_tokens != dv.n_tokens or tv.type != dv.type or (tv.bos, tv.eos) != (dv.bos, dv.eos):
        raise ValueError(f"the draft model's vocabulary ({dv.n_tokens} tokens) is not the target's "
                         f"({tv.n_tokens} tokens)")
    for t in range(0, tv.n_tokens, max(1, tv.n_tokens // 512)):
        if tv.token_to_piece(t, True) != dv.token_to_piece(t, True):
            raise ValueError(f"the draft model's token {t} differs from the target's")


class DraftModel:
    """A draft model and its context (see the module docstring)."""

    def __init__(self, model: Model, ctx: Context, n_slots: int, own_model: bool = True):
        self.model, self.ctx = model, ctx
        self._own_model = own_model
        self.batch = Batch(max(ctx.n_batch, 64) + n_slots, 1)
        self.held = [np.zeros(0, np.int32) for _ in range(n_slots)]  # tokens each sequence holds
        self.n_decode = 0  # draft decodes (for the figures)

    @classmethod
    def for_engine(cls, target: Model, cfg, target_ctx: Context) -> "DraftModel":
        prm = cfg.speculative
        same = str(target.path) == str(prm.draft_model)
        model = target if same else Model(prm.draft_model)
        try:
            if not same:
                check_vocab(target, model)
            cp = cfg.context_params()
            if prm.draft_ctx:
                cp = dataclasses.replace(cp, n_ctx=prm.draft_ctx)
            # on the target context's thread pool: a pool of its own would keep its workers
            # polling while the target decodes (seen: each target decode 7x slower)
            ctx = Context(model, cp, threadpool_of=target_ctx)
        except Exception:
            if not same:
                model.close()
            raise
        return cls(model, ctx, cfg.n_parallel, own_model=not same)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        if self._own_model:
            self.model.close()

    # -- drafting ---------------------------------------------------------------------------

    def draft_many(self, items: list[tuple[Slot, np.ndarray, int]],
                   p_min: Callable[[Slot], float]) -> dict[int, np.ndarray]:
        """Greedy drafts of up to `limit` tokens for each (slot, history, limit)."""
        items = [it for it in items if it[2] > 0 and len(it[1]) > 1]
        if not items:
            return {}
        if not self._catch_up(items):
            return {}
        batch = self.batch
        out: dict[int, list[int]] = {s.id: [] for s, _, _ in items}
        cur = {s.id: (int(h[-1]), len(h) - 1) for s, h, _ in items}  # token to decode, its position
        live = list(items)
        while live:
            batch.clear()
            rows = {}
            for s, h, limit in live:
                tok, pos = cur[s.id]
                rows[s.id] = batch.add(tok, pos, s.seq_id, True)
            if self.ctx.decode(batch.view(0)) != 0:
                for s, _, _ in live:
                    out[s.id] = out[s.id][:0]
                    self._forget(s)
                break
            self.n_decode += 1
            nxt = []
            for s, h, limit in live:
                tok, pos = cur[s.id]
                self.held[s.id] = np.append(self.held[s.id], np.int32(tok))
                row = self.ctx.logits(rows[s.id])
                best = int(np.argmax(row))
                pm = p_min(s)
                if pm > 0.0:
                    m = float(row[best])
                    p = 1.0 / float(np.exp(row - m, dtype=np.float32).sum(dtype=np.float64))
                    if p < pm:
                        continue
                out[s.id].append(best)
                cur[s.id] = (best, pos + 1)
                if len(out[s.id]) < limit:
                    nxt.append((s, h, limit))
            live = nxt
        return {sid: np.asarray(d, np.int32) for sid, d in out.items() if d}

    def _catch_up(self, items) -> bool:
        """Each slot's draft sequence made to hold its history but the last token."""
        mem, batch, n_batch = self.ctx.memory, self.batch, self.ctx.n_batch
        batch.clear()
        todo: list[tuple[int, int, np.ndarray]] = []  # (sequence, first position, tokens)
        for s, h, _ in items:
            want = h[:-1]
            have = self.held[s.id]
            n = min(len(have), len(want))
            same = int(np.argmin(np.append(have[:n] == want[:n], False)))  # common prefix
            if same < len(have):
                mem.seq_rm(s.seq_id, same, -1)
                self.held[s.id] = have[:same]
            if same < len(want):
                todo.append((s.seq_id, same, want[same:]))
        for seq, p0, toks in todo:  # in chunks of n_batch, several sequences per decode
            slot_id = seq - 1
            i = 0
            while i < len(toks):
                room = min(n_batch, batch.capacity) - batch.n_tokens
                if room <= 0:
                    if not self._flush():
                        return False
                    continue
                piece = toks[i:i + room]
                batch.add_sequence(piece, p0 + i, seq, logits_last=False)
                i += len(piece)
            self.held[slot_id] = np.concatenate([self.held[slot_id], toks]).astype(np.int32)
        return self._flush()

    def _flush(self) -> bool:
        batch = self.batch
        if batch.n_tokens == 0:
            return True
        ret = self.ctx.decode(batch.view(0))
        batch.clear()
        if ret != 0:  # no room: start the draft sequences over
            log.warning("draft model: decode failed (%d); its cache starts over", ret)
            self.ctx.memory.clear()
            self.held = [np.zeros(0, np.int32) for _ in self.held]
            return False
        self.n_decode += 1
        return True

    def _forget(self, s: Slot) -> None:
        self.ctx.memory.seq_rm(s.seq_id, -1, -1)
        self.held[s.id] = np.zeros(0, np.int32)
