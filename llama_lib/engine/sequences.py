"""The slots' KV sequences as the prompt cache sees them: what each holds, and the edits every
part of the cache makes (reset to the system prompt, adopt loaded cells).

Every slot's sequence starts with the shared system prompt (when its request continues it) and,
while idle, holds the last request's prompt and generated tokens (`Slot.cache_tokens`). The
prompt cache (prompt_cache.py), prefix sharing (prefix_share.py) and slot files (slot_files.py)
read and edit sequences through this one object. Engine thread only, but for reads of Python
fields.
"""

from __future__ import annotations

import numpy as np

from ..context import Memory
from .slot import Slot
from .system_prompt import SystemPrompt


class SlotSequences:
    """The slots, their KV sequences (through `memory`) and the system prompt they start with."""

    def __init__(self, memory: Memory, slots: list[Slot], system: SystemPrompt, *, n_swa: int,
                 kv_unified: bool):
        self.memory = memory
        self.slots = slots
        self.system = system
        self.n_swa = n_swa              # sliding-window size whose old cells the KV drops; 0: none
        self.kv_unified = kv_unified

    def holds_cache(self, s: Slot, want_prefix: int | None = None) -> bool:
        """Does the slot's sequence hold exactly its prefix and cached tokens (and, if given,
        the prefix the request wants)?"""
        if want_prefix is not None and not self.system.fits(s, want_prefix):
            return False
        if not self.system.is_current(s.n_prefix, s.prefix_version):
            return False
        return bool(len(s.cache_tokens)) and \
            self.memory.seq_pos_max(s.seq_id) == s.n_prefix + len(s.cache_tokens) - 1

    def window_kept(self, seq_id: int, n_past: int) -> bool:
        """Whether the sequence's KV still holds what a token at position n_past attends to.

        A sliding-window cache that is not full-size (Gemma 3: window 512) overwrites cells
        that fell out of the window, so a sequence may hold only its last positions;
        decoding from n_past needs the window before it (llama-server checks the same with
        llama_memory_seq_pos_min and re-processes the whole prompt otherwise).
        """
        if self.n_swa <= 0:
            return True
        pos_min = self.memory.seq_pos_min(seq_id)
        return 0 <= pos_min <= max(0, n_past - self.n_swa)

    def reset(self, s: Slot, with_prefix: bool) -> None:
        """Empty a slot's sequence, then give it the current system prompt if asked."""
        self.memory.seq_rm(s.seq_id, -1, -1)
        s.n_prefix = 0
        s.cache_tokens = np.zeros(0, np.int32)
        system = self.system
        if with_prefix and len(system.tokens):
            self.memory.seq_cp(0, s.seq_id, -1, -1)
            s.n_prefix = len(system.tokens)
            s.prefix_version = system.version
        s.n_past = s.n_prefix
        s.kv_pos_max = self.memory.seq_pos_max(s.seq_id)

    def reset_to_default(self, s: Slot) -> None:
        """Reset to what an idle slot holds: the system prompt when it is shared."""
        self.reset(s, with_prefix=self.system.shared)

    @staticmethod
    def adopt(s: Slot, tokens: np.ndarray, n_prefix: int, prefix_version: int) -> None:
        """The slot's sequence was just loaded with a prefix of n_prefix system prompt tokens
        then `tokens`: they are its cache now."""
        s.cache_tokens = tokens.copy()
        s.n_prefix, s.prefix_version = n_prefix, prefix_version
        s.n_past = n_prefix + len(tokens)
        s.kv_pos_max = s.n_past - 1
