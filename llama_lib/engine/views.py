"""What an Engine shows and keeps of its slots without stopping: queue and slot snapshots,
cache and per-user figures, and llama-server's slot files (save, restore, erase: run on the
engine thread while the slot is idle). A mixin of core.Engine, which owns the state read here."""

from __future__ import annotations

import numpy as np

from .ram_cache import summary
from .slot_files import SlotFile, on_idle_slot


class EngineViews:
    """Read-mostly accessors of core.Engine (see the module docstring)."""

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def waiting_prompts(self) -> list[np.ndarray]:
        """The prompt tokens of the requests waiting for a slot, in order (a snapshot)."""
        with self._lock:
            return [r.prompt_tokens for r in self._waiting]

    @property
    def n_busy(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    def ram_cache_stats(self) -> dict[str, int]:  # the host-RAM tier's counters (ram_cache.summary)
        return summary(self.cache.ram)

    def share_stats(self) -> dict[str, int]:
        """Shared prefixes, cached prompt tokens by tier, evictions (PromptCache.summary)."""
        return self.cache.summary()

    def users_info(self) -> list[dict]:
        """Per user: waiting, running, parked, mean wait, preemptions (WaitingQueue.users_info)."""
        with self._lock:
            return self._waiting.users_info()

    def slots_info(self) -> list[dict]:
        """A snapshot of every slot, for monitoring (read without stopping the engine)."""
        return [s.info(self.n_ctx_slot) | (self.spec.info(s) if self.spec else {}) for s in self.slots]

    # -- slot files (llama-server's /slots/{id}?action=...): on the engine thread, slot idle --

    def save_slot(self, slot_id: int, path: str) -> SlotFile:
        """Save the slot's KV sequence and tokens to `path` (waits for the slot to be idle)."""
        return on_idle_slot(self.slots, self.call, slot_id, lambda s: self.files.save(s, path))

    def restore_slot(self, slot_id: int, path: str) -> SlotFile:
        """Load a saved sequence into the slot, as its prompt cache. ValueError if it cannot."""
        return on_idle_slot(self.slots, self.call, slot_id, lambda s: self.files.restore(s, path))

    def erase_slot(self, slot_id: int) -> int:
        """Drop the slot's prompt cache; returns the tokens it held."""
        return on_idle_slot(self.slots, self.call, slot_id, self.files.erase)
