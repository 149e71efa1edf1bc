"""Batch: a llama_batch whose arrays are numpy views over the C memory.

Writes through the numpy arrays land directly in the struct that llama_decode reads, so a whole
prompt goes in with a few slice assignments and a chunk of the batch is handed to llama_decode
as a `view()` that copies no token.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from . import _bindings as B
from .loader import lib

_I32 = ctypes.sizeof(ctypes.c_int32)
_PTR = ctypes.sizeof(ctypes.c_void_p)


class Batch:
    """Up to `capacity` tokens, each in up to `n_seq_max` sequences.

    Arrays (all views of C memory, length `capacity`): `token`, `pos`, `n_seq_id`, `logits`
    (int8 output flags) and `seq_id` of shape (capacity, n_seq_max). llama_batch_init allocates
    one small buffer per token for the sequence ids; we point those per-token pointers at the
    rows of one contiguous table instead, so that ids can be written with slices too, and put
    the original pointers back before llama_batch_free.
    """

    def __init__(self, capacity: int, n_seq_max: int = 1):
        if capacity <= 0 or n_seq_max <= 0:
            raise ValueError("a batch needs a positive capacity and n_seq_max")
        L = lib()
        self._free_fn = L.llama_batch_free
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self._c = L.llama_batch_init(capacity, 0, n_seq_max)
        if not self._c.token:
            raise MemoryError(f"llama_batch_init({capacity}) failed")
        c = self._c
        self.token = np.ctypeslib.as_array(c.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(c.pos, shape=(capacity,))
        self.n_seq_id = np.ctypeslib.as_array(c.n_seq_id, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(c.logits, shape=(capacity,))
        # The pointer table (capacity + 1 entries: llama_batch_init ends it with NULL).
        ptr_table = ctypes.cast(c.seq_id, ctypes.POINTER(ctypes.c_uint64))
        self._seq_ptrs = np.ctypeslib.as_array(ptr_table, shape=(capacity + 1,))
        self._orig_seq_ptrs = self._seq_ptrs[:capacity].copy()
        # The table's memory is a ctypes array so that it lives exactly as long as this object.
        self._seq_store = (ctypes.c_int32 * (capacity * n_seq_max))()
        self.seq_id = np.ctypeslib.as_array(self._seq_store).reshape(capacity, n_seq_max)
        base = ctypes.addressof(self._seq_store)
        self._seq_ptrs[:capacity] = base + np.arange(capacity, dtype=np.uint64) * (n_seq_max * _I32)
        self._addr = {
            "token": ctypes.cast(c.token, ctypes.c_void_p).value,
            "pos": ctypes.cast(c.pos, ctypes.c_void_p).value,
            "n_seq_id": ctypes.cast(c.n_seq_id, ctypes.c_void_p).value,
            "seq_id": ctypes.cast(c.seq_id, ctypes.c_void_p).value,
            "logits": ctypes.cast(c.logits, ctypes.c_void_p).value,
        }
        self._view = B.llama_batch()
        self.n_tokens = 0

    # -- writing ------------------------------------------------------------------------------

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, token: int, pos: int, seq_ids: Sequence[int] | int, logits: bool = False) -> int:
        """Append one token; returns its index in the batch."""
        i = self.n_tokens
        if i >= self.capacity:
            raise OverflowError(f"batch is full ({self.capacity} tokens)")
        ids = (int(seq_ids),) if isinstance(seq_ids, (int, np.integer)) else tuple(seq_ids)
        if not 0 < len(ids) <= self.n_seq_max:
            raise ValueError(f"a token belongs to 1..{self.n_seq_max} sequences, got {len(ids)}")
        self.token[i] = token
        self.pos[i] = pos
        self.n_seq_id[i] = len(ids)
        self.seq_id[i, : len(ids)] = ids
        self.logits[i] = logits
        self.n_tokens = i + 1
        return i

    def add_sequence(self, tokens: Sequence[int] | np.ndarray, start_pos: int, seq_id: int,
                     logits_last: bool = True) -> int:
        """Append a run of tokens of one sequence at positions start_pos, start_pos+1, ...

        Written with slice assignments, no Python loop. Returns the index of the last token.
        """
        n = len(tokens)
        i = self.n_tokens
        if n == 0:
            raise ValueError("add_sequence needs at least one token")
        if i + n > self.capacity:
            raise OverflowError(f"{n} tokens do not fit: batch holds {i} of {self.capacity}")
        j = i + n
        self.token[i:j] = tokens
        self.pos[i:j] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.n_seq_id[i:j] = 1
        self.seq_id[i:j, 0] = seq_id
        self.logits[i:j] = 0
        if logits_last:
            self.logits[j - 1] = 1
        self.n_tokens = j
        return j - 1

    def add_tokens(self, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray,
                   logits: bool = True) -> int:
        """Append one token for each of several sequences (the decoding step of many slots)."""
        n = len(tokens)
        i = self.n_tokens
        if i + n > self.capacity:
            raise OverflowError(f"{n} tokens do not fit: batch holds {i} of {self.capacity}")
        j = i + n
        self.token[i:j] = tokens
        self.pos[i:j] = positions
        self.n_seq_id[i:j] = 1
        self.seq_id[i:j, 0] = seq_ids
        self.logits[i:j] = logits
        self.n_tokens = j
        return i

    def remove_sequence(self, seq_id: int, start: int = 0, from_pos: int = 0) -> np.ndarray:
        """Drop the tokens from row `start` on whose (first) sequence is seq_id, at positions
        from_pos and later; the others close up in order. Returns every old row's new index,
        -1 for a dropped row."""
        n = self.n_tokens
        keep = (self.seq_id[start:n, 0] != seq_id) | (self.pos[start:n] < from_pos)
        n_kept = int(keep.sum())
        new_index = np.full(n, -1, dtype=np.int64)
        new_index[:start] = np.arange(start)
        new_index[start:n][keep] = start + np.arange(n_kept)
        for arr in (self.token, self.pos, self.n_seq_id, self.logits):
            arr[start:start + n_kept] = arr[start:n][keep]
        self.seq_id[start:start + n_kept, 0] = self.seq_id[start:n, 0][keep]
        self.n_tokens = start + n_kept
        return new_index

    def permute(self, order: np.ndarray) -> np.ndarray:
        """Reorder the rows: new row j is old row order[j]. Returns every old row's new index."""
        n = self.n_tokens
        for arr in (self.token, self.pos, self.n_seq_id, self.logits, self.seq_id):
            arr[:n] = arr[:n][order]
        new_index = np.empty(n, dtype=np.int64)
        new_index[order] = np.arange(n)
        return new_index

    # -- reading ------------------------------------------------------------------------------

    def view(self, start: int = 0, n: int | None = None) -> B.llama_batch:
        """A llama_batch over tokens [start, start+n) that points into this batch's memory.

        No token is copied. The returned struct is reused by the next call to view().
        """
        if n is None:
            n = self.n_tokens - start
        if start < 0 or n < 0 or start + n > self.n_tokens:
            raise IndexError(f"view [{start}, {start + n}) outside the batch's {self.n_tokens} tokens")
        a = self._addr
        v = self._view
        v.n_tokens = n
        v.token = ctypes.cast(a["token"] + start * _I32, ctypes.POINTER(B.llama_token))
        v.embd = None
        v.pos = ctypes.cast(a["pos"] + start * _I32, ctypes.POINTER(B.llama_pos))
        v.n_seq_id = ctypes.cast(a["n_seq_id"] + start * _I32, ctypes.POINTER(ctypes.c_int32))
        v.seq_id = ctypes.cast(a["seq_id"] + start * _PTR, ctypes.POINTER(ctypes.POINTER(B.llama_seq_id)))
        v.logits = ctypes.cast(a["logits"] + start, ctypes.POINTER(ctypes.c_int8))
        return v

    @property
    def c_batch(self) -> B.llama_batch:
        """The whole filled batch as a llama_batch."""
        return self.view(0, self.n_tokens)

    def __len__(self) -> int:
        return self.n_tokens

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        c, self._c = getattr(self, "_c", None), None
        if c is not None and c.token:
            self._seq_ptrs[: self.capacity] = self._orig_seq_ptrs  # give back what C allocated
            self._free_fn(c)

    __del__ = close

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

