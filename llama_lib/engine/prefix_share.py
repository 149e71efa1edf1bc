"""Prefixes shared between KV sequences: never decode the same prompt prefix twice.

A slot reuses its own sequence's cache (prompt_cache.py); here every other sequence counts
too. `PrefixShare` is a part of the prompt cache: it finds and copies prefixes, and the
functions at the end tell the step which waiting slots may start (`ready_followers`). The longest prefix of a new prompt that any sequence holds, an idle slot's cache, a
holder's idle prefix (holders.py) or the tokens a live request has decoded so far, is copied into the new request's sequence with
llama_memory_seq_cp, and only the rest is decoded. A prompt that shares a longer prefix with
one still being decoded waits for those cells (slot phase WAIT) instead of decoding them a
second time: requests that arrive together with a common document decode it once. The leader
stops its prefill at the branch point for that step, so that a sliding-window cache still
holds the window the followers need there.

llama.cpp's seq_cp (src/llama-kv-cache.cpp): in a unified KV cache the cells of [0, n) get the
new sequence's tag (no copy, no new cells; a shared cell is freed when its last sequence drops
it); with a stream per sequence only a whole stream can be copied (the buffer copy runs at the
start of the next llama_decode), so the copy is followed by removing the tail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .holders import Holder, Holders
from .prefix_tree import common_prefix
from .request import Request
from .sequences import SlotSequences
from .slot import GENERATE, IDLE, PREFILL, WAIT, Slot, kept_tokens

log = logging.getLogger("llama_lib.engine")

# Fewer extra tokens than this are decoded again rather than copied from another sequence or
# waited for (a copy and a step's wait cost more than decoding a few tokens in the batch).
MIN_SHARED = 16


@dataclass
class ShareStats:
    n_copies: int = 0         # prefixes copied from another sequence
    n_tokens_copied: int = 0  # prompt tokens those gave (not decoded)
    n_waits: int = 0          # requests that waited for a live request's prefill


@dataclass
class Share:
    """Another sequence holding (or, while `pending`, about to hold) a prefix of a prompt:
    a slot's, or a holder's (never pending)."""
    src: Slot | Holder
    n_keep: int          # prompt tokens after the system prefix it gives
    pending: bool        # its request is still decoding them: wait for it


class PrefixShare:
    """Finds the longest prefix of a prompt that another sequence holds, and copies it."""

    def __init__(self, seqs: SlotSequences, holders: Holders | None):
        self.seqs = seqs
        self.holders = holders
        self.stats = ShareStats()

    def sources(self, dst: Slot, r: Request, want_prefix: int) -> tuple[Share | None, Share | None]:
        """The best sequence to copy from now, and the best live prefill to wait for (each None
        if there is none); the prompt's last token is always decoded again, for its logits."""
        seqs = self.seqs
        fits = seqs.system.fits
        limit = len(r.prompt_tokens) - 1
        now = later = None
        for s in seqs.slots:
            if s is dst or s.phase is WAIT or not fits(s, want_prefix):
                continue
            if s.phase is IDLE:  # its cache (a slot just reserved for a request still holds it)
                if not seqs.holds_cache(s):
                    continue
                tokens, n_held = s.cache_tokens, len(s.cache_tokens)
            else:
                held = seqs.memory.seq_pos_max(s.seq_id) + 1 - s.n_prefix
                tokens = s.req.prompt_tokens
                if s.phase is GENERATE and (held > len(tokens) or s.n_shifted):
                    tokens = kept_tokens(s, np.concatenate([tokens, np.asarray(s.req.tokens, np.int32)]))
                n_held = max(0, held)
            n = min(common_prefix(tokens, r.prompt_tokens), limit)
            n_now = min(n, n_held)
            if n_now > 0 and (now is None or n_now > now.n_keep) \
                    and seqs.window_kept(s.seq_id, s.n_prefix + n_now):
                now = Share(s, n_now, False)
            if s.phase is PREFILL and n > n_held and (later is None or n > later.n_keep):
                later = Share(s, n, True)
        if self.holders is not None:
            for h, n in self.holders.match(r.prompt_tokens).items():
                n = min(n, limit)
                if n > 0 and (now is None or n > now.n_keep) and fits(h, want_prefix) \
                        and seqs.window_kept(h.seq_id, h.n_prefix + n):
                    now = Share(h, n, False)
        return now, later

    def copy_prefix(self, src: Slot | Holder, dst: Slot, n_keep: int) -> bool:
        """Make dst's sequence hold src's system prefix and first n_keep tokens after it."""
        mem = self.seqs.memory
        n_total = src.n_prefix + n_keep
        mem.seq_rm(dst.seq_id, -1, -1)
        if self.seqs.kv_unified:
            mem.seq_cp(src.seq_id, dst.seq_id, 0, n_total)
        else:  # only a whole stream copies; then drop what follows the prefix
            mem.seq_cp(src.seq_id, dst.seq_id, -1, -1)
            mem.seq_rm(dst.seq_id, n_total, -1)
        if mem.seq_pos_max(dst.seq_id) != n_total - 1:
            log.warning("slot %d: copying %d tokens from sequence %d failed; the prompt is decoded",
                        dst.id, n_total, src.seq_id)
            return False
        if isinstance(src, Holder):
            self.holders.touch(src)
        dst.cache_tokens = np.zeros(0, np.int32)
        dst.n_prefix, dst.prefix_version = src.n_prefix, src.prefix_version
        dst.n_past = n_total
        self.stats.n_copies += 1
        self.stats.n_tokens_copied += n_keep
        return True


def pause_leaders(slots: list[Slot]) -> None:
    """Each prefilling slot that others wait for stops at the nearest branch point ahead."""
    for s in slots:
        s.hold_at = 0
    for f in slots:
        lead = f.follow
        if f.phase is not WAIT or lead is None or lead.req is not f.follow_req:
            continue
        if lead.phase is PREFILL and lead.prompt_pos < f.follow_n:
            lead.hold_at = f.follow_n if not lead.hold_at else min(lead.hold_at, f.follow_n)


def ready_followers(slots: list[Slot]) -> list[tuple[Slot, Request]]:
    """The waiting slots whose leader has decoded the shared prefix (or is gone), with their
    requests, to start again (Engine._start); they stop following."""
    ready = []
    for f in slots:
        if f.phase is not WAIT:
            continue
        lead = f.follow
        if lead.req is f.follow_req and lead.phase is PREFILL and lead.prompt_pos < f.follow_n:
            continue  # still decoding it
        f.follow = f.follow_req = None
        ready.append((f, f.req))
    return ready
