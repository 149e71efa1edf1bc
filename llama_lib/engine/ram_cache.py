"""The prompt cache's host-RAM tier (llama-server's --cache-ram): KV sequences that a slot is
about to overwrite are kept as bytes (llama_state_seq_get_data) and put back into a slot
(llama_state_seq_set_data) when a later prompt shares more with them than with the slot's own
cache. Bounded in bytes, least recently used out. Engine thread only.

The choice follows llama-server's server_prompt_cache: an entry must keep at least a quarter of
its tokens (large prompts are not trashed for a short match), and beat the slot's own cache both
in the share of the entry kept and in the share of the prompt covered. Entries are indexed by a
radix tree (prefix_tree.py): a lookup walks the prompt once, however many entries there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .prefix_tree import PrefixTree

MIN_KEEP = 0.25  # of an entry's tokens a prompt must share to load it
MIN_TOKENS = 16  # shorter caches are cheaper to recompute than to keep


@dataclass(eq=False)  # entries are compared by identity
class RamEntry:
    tokens: np.ndarray      # the cached tokens after the system prompt prefix
    n_prefix: int           # system prompt tokens the sequence starts with
    prefix_version: int
    data: bytes             # llama_state_seq_get_data of the whole sequence
    t_used: int = 0


@dataclass
class RamStats:
    n_saved: int = 0            # sequences stored
    n_loaded: int = 0           # sequences put back into a slot
    n_tokens_loaded: int = 0    # cached tokens those brought back (before trimming to the prompt)
    n_evicted: int = 0


@dataclass
class RamCache:
    limit_bytes: int
    entries: list[RamEntry] = field(default_factory=list)
    n_bytes: int = 0
    stats: RamStats = field(default_factory=RamStats)
    tree: PrefixTree = field(default_factory=PrefixTree)
    # bytes kept outside the entries against the same limit: parked requests' KV (preempt.py)
    n_reserved: int = 0
    _clock: int = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def best(self, prompt: np.ndarray, n_prefix: int, version: int, keep: int, cached: int) -> RamEntry | None:
        """The entry worth loading for `prompt`, given that the slot's own cache of `cached`
        tokens keeps `keep` of them; None if the slot's cache is as good."""
        f_keep = keep / cached if cached else -1.0
        f_sim = keep / len(prompt) if len(prompt) else 0.0
        best = None
        for e, lcp in self.tree.match(prompt).items():
            if e.n_prefix != n_prefix or (n_prefix and e.prefix_version != version):
                continue
            k, s = lcp / len(e.tokens), lcp / len(prompt) if len(prompt) else 0.0
            if k >= MIN_KEEP and k > f_keep and s > f_sim:
                best, f_keep, f_sim = e, k, s
        if best is not None:
            best.t_used = self._tick()
        return best

    def holds(self, tokens: np.ndarray, n_prefix: int) -> bool:
        """Would `put` skip these tokens (too short, or an entry holds all of them)?"""
        if len(tokens) < MIN_TOKENS:
            return True
        return any(n == len(tokens) and e.n_prefix == n_prefix for e, n in self.tree.match(tokens).items())

    def put(self, tokens: np.ndarray, n_prefix: int, version: int, data: bytes) -> bool:
        """Keep a sequence's state; False when it does not fit the limit or is already kept."""
        if len(tokens) < MIN_TOKENS or self.n_reserved + len(data) > self.limit_bytes:
            return False
        shared = [(e, n) for e, n in self.tree.match(tokens).items() if e.n_prefix == n_prefix]
        for e, n in shared:
            if n == len(tokens):
                e.t_used = self._tick()
                return False  # an entry holds all of it (and maybe more)
        for e, n in shared:  # entries this one contains are no longer needed
            if n == len(e.tokens):
                self.remove(e)
        self.make_room(len(data))
        entry = RamEntry(tokens.copy(), n_prefix, version, data, self._tick())
        self.entries.append(entry)
        self.tree.insert(entry, entry.tokens)
        self.n_bytes += len(data)
        self.stats.n_saved += 1
        return True

    def make_room(self, n: int) -> bool:
        """Evict the least recently used entries until `n` more bytes fit the limit beside
        what is held and reserved; False when they cannot."""
        while self.entries and self.n_bytes + self.n_reserved + n > self.limit_bytes:
            self.remove(min(self.entries, key=lambda e: e.t_used))
            self.stats.n_evicted += 1
        return self.n_bytes + self.n_reserved + n <= self.limit_bytes

    def remove(self, entry: RamEntry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            self.tree.remove(entry)
            self.n_bytes -= len(entry.data)


def summary(ram: RamCache | None) -> dict[str, int]:
    """Bytes and entries held; sequences saved, loaded back and evicted; cached tokens loaded.
    All 0 when the tier is off."""
    if ram is None:
        return dict.fromkeys(("bytes", "entries", "saved", "loaded", "tokens_loaded", "evicted", "parked_bytes"), 0)
    st = ram.stats
    return {"bytes": ram.n_bytes, "parked_bytes": ram.n_reserved, "entries": len(ram.entries), "saved": st.n_saved, "loaded": st.n_loaded,
            "tokens_loaded": st.n_tokens_loaded, "evicted": st.n_evicted}
