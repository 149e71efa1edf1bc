"""Idle prompt prefixes kept in spare KV sequences (unified KV cache only).

A slot holds one prompt cache: its last request's tokens. When a new request is about to
overwrite part of it (PromptCache.keep_aside), the cache moves to a holder, a sequence id past the slots', with
llama_memory_seq_cp. In a unified cache that only tags the cells the slot already has with the
holder's id (no copy, no new cells), so the prefix stays in KV for whichever later request
shares it (prefix_share.py copies it out the same way). Holders are indexed by a radix tree
(prefix_tree.py) and go least recently used first: when all are taken, and when a decode finds
no room in the KV cache (PromptCache.evict), where the one to go is saved to the host-RAM tier
first. So a full cache degrades to a cache of slots, never below it.

With a KV stream per sequence there are no holders: a holder would need cells of its own, and
the host-RAM tier keeps overwritten caches instead. Engine thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..context import Memory
from .prefix_tree import PrefixTree
from .ram_cache import MIN_TOKENS

log = logging.getLogger("llama_lib.engine")


@dataclass(eq=False)  # compared (and hashed, in the tree) by identity
class Holder:
    seq_id: int
    tokens: np.ndarray    # what the sequence holds after the system prompt prefix
    n_prefix: int         # system prompt tokens it starts with
    prefix_version: int
    t_used: float


@dataclass
class HolderStats:
    n_kept: int = 0      # slot caches moved to a holder
    n_evicted: int = 0   # holders dropped to make room (saved to the RAM tier when it is on)


SaveFn = Callable[[int, np.ndarray, int, int], None]  # (seq_id, tokens, n_prefix, version)


class Holders:
    """Spare sequences first_seq_id .. first_seq_id + n - 1 holding idle prefixes."""

    def __init__(self, memory: Memory, first_seq_id: int, n: int, save: SaveFn):
        self.memory = memory
        self.capacity = n
        self._free = list(range(first_seq_id + n - 1, first_seq_id - 1, -1))
        self.held: list[Holder] = []
        self.tree = PrefixTree()
        self.stats = HolderStats()
        self._save = save  # called with a holder's sequence before it is dropped

    def __len__(self) -> int:
        return len(self.held)

    @property
    def n_tokens(self) -> int:
        """Tokens the holders' sequences hold (cells shared with others counted in each)."""
        return sum(h.n_prefix + len(h.tokens) for h in self.held)

    def keep(self, src_seq: int, tokens: np.ndarray, n_prefix: int, version: int,
             protect: Holder | None = None) -> bool:
        """Tag what sequence src_seq holds (n_prefix system tokens, then `tokens`) with a
        holder's id, making room by evicting any holder but `protect` (about to be copied
        from). True when a holder has all of it now."""
        if len(tokens) < MIN_TOKENS or not self.capacity:
            return False
        now = time.perf_counter()
        for h, n in list(self.tree.match(tokens).items()):
            if h.n_prefix != n_prefix or h.prefix_version != version:
                continue
            if n == len(tokens):     # held already (maybe with more after it)
                h.t_used = now
                return True
            if n == len(h.tokens) and h is not protect:   # the new prefix contains this one
                self.drop(h)
        if not self._free:
            old = min((h for h in self.held if h is not protect), key=lambda h: h.t_used, default=None)
            if old is None:
                return False
            self.evict(old)
        seq = self._free.pop()
        mem = self.memory
        mem.seq_rm(seq, -1, -1)
        mem.seq_cp(src_seq, seq, -1, -1)
        if mem.seq_pos_max(seq) != n_prefix + len(tokens) - 1:
            log.warning("holding sequence %d's %d tokens in sequence %d failed", src_seq,
                        n_prefix + len(tokens), seq)
            mem.seq_rm(seq, -1, -1)
            self._free.append(seq)
            return False
        h = Holder(seq, tokens.copy(), n_prefix, version, now)
        self.held.append(h)
        self.tree.insert(h, h.tokens)
        self.stats.n_kept += 1
        return True

    def match(self, prompt: np.ndarray) -> dict[Holder, int]:
        """Holders sharing a prefix with the prompt, with its length (tokens after the prefix)."""
        return self.tree.match(prompt)

    def touch(self, h: Holder) -> None:
        h.t_used = time.perf_counter()

    def oldest(self) -> Holder | None:
        return min(self.held, key=lambda h: h.t_used) if self.held else None

    def evict(self, h: Holder) -> None:
        log.info("dropping the prefix held in sequence %d (%d tokens)", h.seq_id, h.n_prefix + len(h.tokens))
        self._save(h.seq_id, h.tokens, h.n_prefix, h.prefix_version)
        self.drop(h)
        self.stats.n_evicted += 1

    def drop(self, h: Holder) -> None:
        """Free the holder's sequence (its cells go once no other sequence has them)."""
        self.memory.seq_rm(h.seq_id, -1, -1)
        self.tree.remove(h)
        self.held.remove(h)
        self._free.append(h.seq_id)

    def lend(self) -> int | None:
        """A holder sequence for another use (a parked request, preempt.py), the least recently
        used idle prefix evicted if none is free; None when there are no holders. Empty."""
        if not self._free and self.held:
            self.evict(self.oldest())
        if not self._free:
            return None
        seq = self._free.pop()
        self.memory.seq_rm(seq, -1, -1)
        return seq

    def take_back(self, seq: int) -> None:
        """A lent sequence is free again (its cells go once no other sequence has them)."""
        self.memory.seq_rm(seq, -1, -1)
        self._free.append(seq)

    def drop_stale(self, version: int) -> None:
        """Drop holders that start with a system prompt other than the current one."""
        for h in [h for h in self.held if h.n_prefix and h.prefix_version != version]:
            self.drop(h)
