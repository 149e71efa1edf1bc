"""A slot's KV sequence saved to a file and restored into any slot later (llama-server's
`POST /slots/{id}?action=save|restore|erase`), in llama_state_seq_save_file's format through
llama_lib.state_file, which never follows a symlink in the folder (issue 30).

`SlotFiles` is a part of the prompt cache's family: it reads and edits the slots' sequences
(sequences.py) through the context's state calls. Each action runs on the engine thread
(Engine.call, through `on_idle_slot`) once the slot holds no request: while one
runs, the caller waits for it to end, as llama-server defers the task. What a file holds is the
sequence's cells and its tokens (the shared system prompt's, if the sequence starts with it,
then the cached prompt and answer), so a restored slot serves a request sharing that prefix from
the cache, as if it had computed it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np

from .. import state_file
from ..context import Context, ContextError
from .sequences import SlotSequences
from .slot import Slot

T = TypeVar("T")


@dataclass
class SlotFile:
    n_tokens: int   # tokens saved / restored (llama-server's n_saved / n_restored)
    n_bytes: int    # bytes written / read
    t_ms: float


def on_idle_slot(slots: list[Slot], call: Callable[[Callable[[], Any]], Any], slot_id: int,
                 fn: Callable[[Slot], T]) -> T:
    """Run fn(slot) through `call` (Engine.call: on the engine thread) once the slot is idle;
    raises ValueError for a slot id the engine does not have."""
    if not 0 <= slot_id < len(slots):
        raise ValueError(f"Invalid slot ID: {slot_id} (this engine has slots 0..{len(slots) - 1})")
    s = slots[slot_id]

    def attempt():
        return (False, s.req) if s.req is not None else (True, fn(s))

    while True:
        done, value = call(attempt)
        if done:
            return value
        value.wait()  # the request the slot runs; then try again (another may have come first)


class SlotFiles:
    """Save, restore and erase idle slots' sequences (engine thread only)."""

    def __init__(self, ctx: Context, seqs: SlotSequences, n_ctx_slot: int, n_vocab: int):
        self.ctx = ctx
        self.seqs = seqs
        self.n_ctx_slot = n_ctx_slot
        self.n_vocab = n_vocab

    def sequence_tokens(self, s: Slot) -> np.ndarray:
        """The tokens the slot's KV sequence holds: the system prompt it starts with, its cache."""
        head = self.seqs.system.tokens[:s.n_prefix] if s.n_prefix else np.zeros(0, np.int32)
        return np.concatenate([head, s.cache_tokens]).astype(np.int32)

    def save(self, s: Slot, path: str) -> SlotFile:
        t0 = time.perf_counter()
        if not self.seqs.holds_cache(s):  # nothing cached, an outdated prefix, or other cells
            self.seqs.reset_to_default(s)
        tokens = self.sequence_tokens(s)
        try:
            n = state_file.write(path, s.seq_id, tokens, self.ctx.seq_state_view(s.seq_id))
        except state_file.StateFileError as err:
            raise ValueError(f"Unable to save slot: {err}") from None
        except IsADirectoryError:
            raise ValueError("Unable to save slot: the name is a folder's") from None
        except OSError as err:
            raise OSError(f"Unable to save slot: {err}") from None
        return SlotFile(len(tokens), n, (time.perf_counter() - t0) * 1000.0)

    def restore(self, s: Slot, path: str) -> SlotFile:
        t0 = time.perf_counter()
        seqs = self.seqs
        memory = self.ctx.memory
        try:  # read first: a file refused leaves the slot's cache as it was
            tokens, state, n = state_file.read(path, s.seq_id, self.n_ctx_slot)
        except state_file.StateFileError as err:
            raise ValueError(f"Unable to restore slot: {err}") from None
        memory.seq_rm(s.seq_id, -1, -1)
        try:
            if not self.ctx.set_seq_state(s.seq_id, state):
                raise ContextError("no available space in the KV cache, or not a valid slot save file")
            if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.n_vocab):
                raise ContextError("invalid tokens in slot save file")
            if memory.seq_pos_max(s.seq_id) != len(tokens) - 1:
                raise ContextError("the file's cells do not match its tokens")
        except ContextError as err:
            seqs.reset_to_default(s)
            raise ValueError(f"Unable to restore slot: {err}") from None
        system = seqs.system.tokens
        n_prefix = len(system) if len(system) and np.array_equal(tokens[:len(system)], system) else 0
        seqs.adopt(s, tokens[n_prefix:], n_prefix, seqs.system.version)
        s.t_last = time.perf_counter()
        return SlotFile(len(tokens), n, (time.perf_counter() - t0) * 1000.0)

    def erase(self, s: Slot) -> int:
        """Drop the slot's cache; returns how many tokens it held (llama-server's n_erased). No file
        is touched (llama-server's erase takes no filename either)."""
        n = s.n_prefix + len(s.cache_tokens)
        self.seqs.reset_to_default(s)
        return n
