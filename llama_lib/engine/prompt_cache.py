"""The prompt cache (llama-server's, and more): which free slot a request gets, how much of a
prompt its sequence reuses, what a finished request leaves behind, which idle cache goes when
the KV cache is full.

Its interface is narrow, as SGLang's BasePrefixCache (`PrefixCache` below): `choose` and
`claim` match and take a prefix for a request, `cache_finished` keeps what a finished request
leaves, `evict` frees an idle prefix. Behind it are its parts, each in its own module: the
slots' sequences (sequences.py), prefixes shared between them (prefix_share.py), holder
sequences (holders.py) and the host-RAM tier (ram_tier.py over ram_cache.py). `choose()` only reads slot state;
the rest edits KV sequences (engine thread only).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Protocol

import numpy as np

from ..context import Memory
from .cache_reuse import reuse_chunks
from .holders import Holders
from .prefix_share import MIN_SHARED, PrefixShare, ShareStats
from .prefix_tree import common_prefix
from .ram_cache import MIN_TOKENS, RamCache
from .ram_tier import RamTier
from .request import Request
from .sequences import SlotSequences
from .slot import Slot, kept_tokens
from .system_prompt import SystemPrompt
from .types import FinishReason

log = logging.getLogger("llama_lib.engine")

_KEPT_REASONS = (FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH)


def _no_save(seq_id: int, tokens: np.ndarray, n_prefix: int, version: int) -> None:
    """Where a holder's prefix goes when it is evicted and there is no RAM tier: nowhere."""


class PrefixCache(Protocol):
    """What the engine asks of its prompt cache."""

    def choose(self, r: Request, free: list[Slot]) -> Slot: ...
    def claim(self, s: Slot, r: Request) -> int | None: ...
    def cache_finished(self, s: Slot, r: Request, reason: FinishReason) -> None: ...
    def evict(self) -> bool: ...


class PromptCache:
    """The slots' KV sequences as a cache of prompts, with its parts (see the module docstring)."""

    def __init__(self, memory: Memory, slots: list[Slot], system: SystemPrompt, *, similarity: float,
                 n_swa: int, kv_unified: bool, state=None, ram_limit_bytes: int = 0,
                 share_prefixes: bool = True, n_holders: int = 0):
        self.seqs = SlotSequences(memory, slots, system, n_swa=n_swa, kv_unified=kv_unified)
        self.memory = memory
        self.slots = slots
        self.system = system
        self.similarity = similarity    # llama-server's --slot-prompt-similarity
        self.n_swa = n_swa
        self.kv_unified = kv_unified
        # the host-RAM tier (ram_tier.py): sequences' states read and written through `state`
        # (the Context: seq_state / set_seq_state); None when off (--cache-ram 0)
        self.ram = RamCache(ram_limit_bytes) if state is not None and ram_limit_bytes > 0 else None
        self.ram_tier = RamTier(self.ram, state, self.seqs) if self.ram is not None else None
        # idle prefixes in spare sequences after the slots' (holders.py; unified KV only),
        # saved to the RAM tier when they go
        save = self.ram_tier.save_seq if self.ram_tier is not None else _no_save
        self.holders = Holders(memory, len(slots) + 1, n_holders, save) \
            if n_holders > 0 and kv_unified and share_prefixes else None
        # other sequences' prefixes copied into a new request's (prefix_share.py); None: off
        self.share = PrefixShare(self.seqs, self.holders) if share_prefixes else None
        self.share_stats = self.share.stats if self.share is not None else ShareStats()
        self.n_kv_evictions = 0  # idle caches dropped from KV (holders' and slots') to make room
        # the last resort of evict(): a parked request's cells moved to host RAM (preempt.py)
        self.evict_parked: Callable[[], bool] | None = None
        # prompt tokens requests found cached, by where: their slot's own cache, another KV
        # sequence (a slot, a holder), the host-RAM tier
        self.hits = {"own": 0, "shared": 0, "ram": 0}
        # llama_memory_can_shift: cache reuse and context shift (ctx_shift.py) need it; not for
        # a sliding-window cache smaller than the full one (Gemma 3 unless --swa-full)
        self.can_shift = memory.can_shift
        self._reuse_warned = False

    def set_system_tokens(self, tokens: np.ndarray) -> None:
        """Sequence 0 now holds `tokens`: idle slots take them now, busy ones when they finish."""
        self.system.replace(tokens)
        if self.holders is not None:
            self.holders.drop_stale(self.system.version)
        for s in self.slots:
            if s.req is None:
                self.seqs.reset(s, with_prefix=True)

    # -- match and claim ---------------------------------------------------------------------

    def choose(self, r: Request, free: list[Slot]) -> Slot:
        """llama-server's slot choice: the free slot whose cache shares the largest fraction
        of the prompt (above the similarity threshold), else the free slot with the lowest id."""
        thold = self.similarity
        if thold > 0 and r.params.cache_prompt:
            want_prefix = self.system.wanted(r.params)
            fits = self.system.fits
            best, best_sim = None, 0.0
            for s in free:
                if not len(s.cache_tokens) or not fits(s, want_prefix):
                    continue
                sim = common_prefix(s.cache_tokens, r.prompt_tokens) / len(r.prompt_tokens)
                if sim > best_sim and sim > thold:
                    best, best_sim = s, sim
            if best is not None:
                return best
        # Not llama-server's least recently used slot: the lowest free id keeps the decoding
        # sequences contiguous, and llama.cpp splits a batch whose sequences have gaps into
        # several ubatches (seen: 8 streams at -np 9, 52 ms a step contiguous, 80 ms with a gap)
        return min(free, key=lambda s: s.id)

    def claim(self, s: Slot, r: Request) -> int | None:
        """Prepare the slot's sequence for the request; returns the prompt tokens it keeps, or
        None when the request waits for a live request to decode the prefix they share (the
        slot is then in phase WAIT and its sequence untouched; prefix_share.ready_followers).

        The sequence gets the longest prefix of the prompt found in its own cache, in another
        KV sequence (prefix_share.py) or in the host-RAM tier (at least the last prompt token
        is decoded again, for its logits); without one it is reset to the system prompt alone.
        """
        want_prefix = self.system.wanted(r.params)
        seqs = self.seqs
        if self.share is not None and r.params.cache_prompt:
            n_keep = self._claim_shared(s, r, want_prefix)
            if n_keep is None:
                return None
            if n_keep:
                self._hit(s, "shared", n_keep)
                return n_keep
        from_ram = False
        if self.ram is not None and r.params.cache_prompt:
            from_ram = self._swap_with_ram(s, r, want_prefix)
        elif self.holders is not None and self._loses(s, common_prefix(s.cache_tokens, r.prompt_tokens)):
            self.keep_aside(s)
        cached = s.cache_tokens
        s.cache_tokens = np.zeros(0, np.int32)
        n_keep = 0
        if self.system.fits(s, want_prefix) \
                and self.memory.seq_pos_max(s.seq_id) == s.n_prefix + len(cached) - 1:
            if r.params.cache_prompt and len(cached):
                n_keep = min(common_prefix(cached, r.prompt_tokens), len(r.prompt_tokens) - 1)
                if n_keep > 0 and not seqs.window_kept(s.seq_id, s.n_prefix + n_keep):
                    log.info("slot %d: %d cached tokens are past the sliding window; "
                             "the prompt is processed again", s.id, n_keep)
                    n_keep = -1
                if n_keep >= 0 and r.params.n_cache_reuse > 0 and self._reuses():
                    n, cached = reuse_chunks(self.memory, s.seq_id, s.n_prefix, cached, r.prompt_tokens,
                                             n_keep, r.params.n_cache_reuse)
                    n_keep = min(n, len(r.prompt_tokens) - 1)
                n_keep = max(n_keep, 0)
            if n_keep > 0:
                if not self.memory.seq_rm(s.seq_id, s.n_prefix + n_keep, -1):
                    n_keep = 0
            if n_keep == 0 and len(cached):
                seqs.reset(s, with_prefix=bool(want_prefix))
        else:
            seqs.reset(s, with_prefix=bool(want_prefix))
        self._hit(s, "ram" if from_ram else "own", n_keep)
        return n_keep

    def _reuses(self) -> bool:
        """Can a request's n_cache_reuse shift cached chunks? (llama-server logs it when not.)"""
        if not self.can_shift and not self._reuse_warned:
            self._reuse_warned = True
            log.warning("cache reuse is not supported by this context (llama_memory_can_shift is "
                        "false); n_cache_reuse is ignored")
        return self.can_shift

    def _hit(self, s: Slot, tier: str, n_keep: int) -> None:
        self.hits[tier] += n_keep
        s.cache_hit = (tier if n_keep else "", n_keep)

    def _own_keep(self, s: Slot, r: Request, want_prefix: int) -> int:
        """Prompt tokens the slot's own cache gives the request (read only)."""
        if not self.seqs.holds_cache(s, want_prefix):
            return 0
        n = min(common_prefix(s.cache_tokens, r.prompt_tokens), len(r.prompt_tokens) - 1)
        return n if n > 0 and self.seqs.window_kept(s.seq_id, s.n_prefix + n) else 0

    def _claim_shared(self, s: Slot, r: Request, want_prefix: int) -> int | None:
        """Wait for, or copy, another sequence's prefix when it beats the slot's own cache and
        the RAM tier by MIN_SHARED tokens; 0 when neither is worth it."""
        own = self._own_keep(s, r, want_prefix)
        now, later = self.share.sources(s, r, want_prefix)
        best_now = now.n_keep if now is not None else 0
        if later is not None and later.n_keep >= max(own, best_now) + MIN_SHARED:
            s.wait_for(r, later.src, later.n_keep)
            self.share.stats.n_waits += 1
            return None
        if now is None or best_now < own + MIN_SHARED:
            return 0
        if self.ram is not None:
            entry = self.ram.best(r.prompt_tokens, want_prefix, self.system.version, own,
                                  len(s.cache_tokens) if own else 0)
            if entry is not None and common_prefix(entry.tokens, r.prompt_tokens) > best_now:
                return 0  # the RAM entry gives more
        if self._loses(s, own):
            self.keep_aside(s, protect=now.src)
        if self.share.copy_prefix(now.src, s, best_now):
            return best_now
        self.seqs.reset(s, with_prefix=bool(want_prefix))
        return 0

    # -- keeping a cache aside: a holder, else the RAM tier ----------------------------------

    @staticmethod
    def _loses(s: Slot, keep: int) -> bool:
        """Would keeping only `keep` of the slot's cached tokens overwrite enough to keep the
        cache aside first? Not llama-server's rule (most of it): with a long shared system text,
        a chat's own turns are a small part of its cache, and they are what its user's next
        request needs (measured: 16 chats on 8 slots decoded 1.8x their distinct tokens)."""
        return len(s.cache_tokens) - keep >= MIN_TOKENS

    def keep_aside(self, s: Slot, protect=None) -> None:
        """Keep the slot's cache before its sequence is overwritten: in a holder sequence
        (unified KV, no copy; never evicting `protect`, the holder about to be copied from),
        else in the RAM tier."""
        if not self.seqs.holds_cache(s):
            return
        if self.holders is None or not self.holders.keep(s.seq_id, s.cache_tokens, s.n_prefix,
                                                         s.prefix_version, protect):
            self.save_to_ram(s)

    def save_to_ram(self, s: Slot) -> None:
        """Keep the slot's cache in the RAM tier (when on) before its sequence is overwritten."""
        if self.ram_tier is not None:
            self.ram_tier.save_slot(s)

    def cache_idle_slots(self) -> None:
        """llama-server's --cache-idle-slots, run when a request starts: every idle slot's cache
        goes to the RAM tier (if not there yet) and, with a unified KV cache, its cells are freed
        for the running requests. Off without a RAM tier, as upstream."""
        if self.ram_tier is None:
            return
        for s in self.slots:
            if s.req is not None or not self.seqs.holds_cache(s):
                continue
            if self.ram_tier.save_slot(s):
                # upstream's test tag, which its test suite reads in the log
                log.debug("slot %d: idle slot saved to the prompt cache __TEST_TAG_CACHE_IDLE_SLOT__", s.id)
            if self.kv_unified:
                self.seqs.reset_to_default(s)

    def _swap_with_ram(self, s: Slot, r: Request, want_prefix: int) -> bool:
        """llama-server's prompt-cache update: the slot's cache goes to RAM (or a holder) when
        the request would overwrite part of it (_loses), and a RAM entry that suits the prompt
        better comes back (True then)."""
        own = self.seqs.holds_cache(s, want_prefix)
        keep = common_prefix(s.cache_tokens, r.prompt_tokens) if own else 0
        entry = self.ram.best(r.prompt_tokens, want_prefix, self.system.version, keep,
                              len(s.cache_tokens) if own else 0)
        if entry is not None or self._loses(s, keep):
            self.keep_aside(s)
        return entry is not None and self.ram_tier.load(s, entry, want_prefix)

    # -- a finished request, eviction --------------------------------------------------------

    def cache_finished(self, s: Slot, r: Request, reason: FinishReason) -> None:
        """Keep what a finished request leaves in its sequence as the slot's cache, or (for a
        cancelled or failed request, a replaced system prompt, a sequence that does not hold
        exactly those tokens) reset the sequence to the system prompt."""
        if not self._keep(s, r, reason):
            self.seqs.reset_to_default(s)
        s.n_past = s.n_prefix + len(s.cache_tokens)
        s.kv_pos_max = self.memory.seq_pos_max(s.seq_id)

    def _keep(self, s: Slot, r: Request, reason: FinishReason) -> bool:
        if reason not in _KEPT_REASONS:
            return False
        if not self.system.is_current(s.n_prefix, s.prefix_version):
            return False
        # the last sampled token was never decoded
        cache = np.concatenate([r.prompt_tokens, np.asarray(r.tokens[:-1], np.int32)]).astype(np.int32)
        cache = kept_tokens(s, cache)  # after context shifts (ctx_shift.py)
        if s.n_prefix + len(cache) != s.n_past or self.memory.seq_pos_max(s.seq_id) != s.n_past - 1:
            log.warning("slot %d: KV does not hold the request's tokens; cache dropped", s.id)
            return False
        s.cache_tokens = cache
        return True

    def evict(self) -> bool:
        """With a unified KV cache, free the cells of the least recently used idle prefix, a
        holder's or an idle slot's cache, saved to the RAM tier first (llama-server drops idle
        slots' caches the same way before halving the batch)."""
        if not self.kv_unified:
            return False  # each sequence has its own cells: evicting frees none for others
        idle = [s for s in self.slots if s.req is None and len(s.cache_tokens)]
        slot = min(idle, key=lambda s: s.t_last) if idle else None
        held = self.holders.oldest() if self.holders is not None else None
        if held is not None and (slot is None or held.t_used <= slot.t_last):
            self.holders.evict(held)
        elif slot is not None:
            log.info("KV cache full: dropping the prompt cache of idle slot %d (%d tokens)",
                     slot.id, len(slot.cache_tokens))
            self.save_to_ram(slot)
            self.seqs.reset_to_default(slot)
        elif self.evict_parked is None or not self.evict_parked():
            return False
        self.n_kv_evictions += 1
        return True

    # -- reads from any thread -----------------------------------------------------------------

    def held_prefixes(self, n_prefix: int) -> list[np.ndarray]:
        """The token arrays the holders keep after n_prefix system tokens (a snapshot of their
        list: the engine thread edits it)."""
        if self.holders is None:
            return []
        return [h.tokens for h in list(self.holders.held) if h.n_prefix == n_prefix]

    def summary(self) -> dict[str, int]:
        """Cached prompt tokens by tier, prefixes shared between sequences, idle caches
        evicted from KV, and the holders (all counters since start, but the holders' gauges)."""
        h = self.holders
        return {**dataclasses.asdict(self.share_stats),
                "tokens_own": self.hits["own"], "tokens_shared": self.hits["shared"],
                "tokens_ram": self.hits["ram"], "kv_evictions": self.n_kv_evictions,
                "holders": len(h) if h is not None else 0,
                "holder_tokens": h.n_tokens if h is not None else 0,
                "holders_kept": h.stats.n_kept if h is not None else 0,
                "holders_evicted": h.stats.n_evicted if h is not None else 0}
