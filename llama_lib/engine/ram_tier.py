"""The host-RAM tier as a part of the prompt cache (llama-server's --cache-ram): a sequence
saved as bytes before it is overwritten (llama_state_seq_get_data), and a saved entry loaded
back into a slot (llama_state_seq_set_data). The index, the choice rule and the byte budget are
ram_cache.py's; this part moves the bytes between the KV cache and it. Engine thread only.
"""

from __future__ import annotations

import logging

import numpy as np

from .ram_cache import RamCache, RamEntry
from .sequences import SlotSequences
from .slot import Slot

log = logging.getLogger("llama_lib.engine")


class RamTier:
    """Saves sequences into a RamCache and loads its entries into slots, through `state` (the
    Context: seq_state / set_seq_state)."""

    def __init__(self, ram: RamCache, state, seqs: SlotSequences):
        self.ram = ram
        self.state = state
        self.seqs = seqs

    def save_seq(self, seq_id: int, tokens: np.ndarray, n_prefix: int, version: int) -> bool:
        """Keep what sequence seq_id holds (n_prefix system tokens of `version`, then `tokens`),
        unless it starts with a system prompt that is no longer the current one, or the tier
        has it already (its state is not read then). True when a new entry was saved."""
        if self.seqs.system.is_current(n_prefix, version) and not self.ram.holds(tokens, n_prefix):
            return self.ram.put(tokens, n_prefix, version, self.state.seq_state(seq_id))
        return False

    def save_slot(self, s: Slot) -> bool:
        """Keep the slot's cache before its sequence is overwritten (if it holds one)."""
        if self.seqs.holds_cache(s):
            return self.save_seq(s.seq_id, s.cache_tokens, s.n_prefix, s.prefix_version)
        return False

    def load(self, s: Slot, entry: RamEntry, want_prefix: int) -> bool:
        """Replace the slot's sequence with the entry's; an entry that does not load is dropped
        and the sequence reset to the system prefix the request wants (False then)."""
        memory = self.seqs.memory
        memory.seq_rm(s.seq_id, -1, -1)
        loaded = self.state.set_seq_state(s.seq_id, entry.data) and \
            memory.seq_pos_max(s.seq_id) == entry.n_prefix + len(entry.tokens) - 1
        if not loaded:
            log.warning("slot %d: a RAM cache entry did not load; dropped", s.id)
            self.ram.remove(entry)
            self.seqs.reset(s, with_prefix=bool(want_prefix))
            return False
        self.seqs.adopt(s, entry.tokens, entry.n_prefix, entry.prefix_version)
        log.debug("slot %d: updating prompt cache: %d tokens loaded from the RAM tier", s.id, len(entry.tokens))
        self.ram.stats.n_loaded += 1
        self.ram.stats.n_tokens_loaded += len(entry.tokens)
        return True
