"""A slot's KV sequence saved to a file and restored into any slot later (llama-server's
`POST /slots/{id}?action=save|restore|erase`), through llama_state_seq_save_file / _load_file.

Each action runs on the engine thread (Engine.call) once the slot holds no request: while one
runs, the caller waits for it to end, as llama-server defers the task. What a file holds is the
sequence's cells and its tokens (the shared system prompt's, if the sequence starts with it,
then the cached prompt and answer), so a restored slot serves a request sharing that prefix from
the cache, as if it had computed it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..context import ContextError
from .slot import Slot

if TYPE_CHECKING:
    from .core import Engine


@dataclass
class SlotFile:
    n_tokens: int   # tokens saved / restored (llama-server's n_saved / n_restored)
    n_bytes: int    # bytes written / read
    t_ms: float


def on_idle_slot(e: "Engine", slot_id: int, fn: Callable[[Slot], object]):
    """Run fn(slot) on the engine thread once the slot is idle; raises ValueError for a slot id
    the engine does not have."""
    if not 0 <= slot_id < len(e.slots):
        raise ValueError(f"Invalid slot ID: {slot_id} (this engine has slots 0..{len(e.slots) - 1})")
    s = e.slots[slot_id]

    def attempt():
        return (False, s.req) if s.req is not None else (True, fn(s))

    while True:
        done, value = e.call(attempt)
        if done:
            return value
        value.wait()  # the request the slot runs; then try again (another may have come first)


def sequence_tokens(e: "Engine", s: Slot) -> np.ndarray:
    """The tokens the slot's KV sequence holds: the system prompt it starts with, its cache."""
    head = e.cache.system_tokens[:s.n_prefix] if s.n_prefix else np.zeros(0, np.int32)
    return np.concatenate([head, s.cache_tokens]).astype(np.int32)


def save(e: "Engine", s: Slot, path: str) -> SlotFile:
    t0 = time.perf_counter()
    if not e.cache.holds_cache(s):  # nothing cached, an outdated prefix, or other cells
        e.cache.reset_sequence(s, with_prefix=e.cache.share_system_prompt)
    tokens = sequence_tokens(e, s)
    try:
        n = e.ctx.seq_save_file(path, s.seq_id, tokens)
    except ContextError as err:
        raise OSError(f"Unable to save slot: {err}") from None
    return SlotFile(len(tokens), n, (time.perf_counter() - t0) * 1000.0)


def restore(e: "Engine", s: Slot, path: str) -> SlotFile:
    t0 = time.perf_counter()
    cache = e.cache
    e.memory.seq_rm(s.seq_id, -1, -1)
    try:
        tokens, n = e.ctx.seq_load_file(path, s.seq_id, e.n_ctx_slot)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= e.vocab.n_tokens):
            raise ContextError("invalid tokens in slot save file")
        if e.memory.seq_pos_max(s.seq_id) != len(tokens) - 1:
            raise ContextError("the file's cells do not match its tokens")
    except ContextError as err:
        cache.reset_sequence(s, with_prefix=cache.share_system_prompt)
        raise ValueError(f"Unable to restore slot: {err}") from None
    system = cache.system_tokens
    n_prefix = len(system) if len(system) and np.array_equal(tokens[:len(system)], system) else 0
    cache.adopt(s, tokens[n_prefix:], n_prefix, cache.system_version)
    s.t_last = time.perf_counter()
    return SlotFile(len(tokens), n, (time.perf_counter() - t0) * 1000.0)


def erase(e: "Engine", s: Slot) -> int:
    """Drop the slot's cache; returns how many tokens it held (llama-server's n_erased)."""
    n = s.n_prefix + len(s.cache_tokens)
    e.cache.reset_sequence(s, with_prefix=e.cache.share_system_prompt)
    return n
