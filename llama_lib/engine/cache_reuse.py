"""llama-server's cache reuse (`n_cache_reuse`, --cache-reuse N): past the prefix a new prompt
shares with a slot's cache, chunks of at least N tokens of the prompt found further on in the
cache are moved into place (`llama_memory_seq_rm` the gap, `llama_memory_seq_add` the chunk)
instead of being decoded again; an edited middle then costs its own tokens only. The algorithm
is upstream's (server-context.cpp): walk the cache, and where the prompt's next tokens match a
run of at least N, shift that run back to the prompt's position. Only where the KV memory can
shift (the prompt cache checks `Memory.can_shift`).
"""

from __future__ import annotations

import logging

import numpy as np

from ..context import Memory

log = logging.getLogger("llama_lib.engine")


def reuse_chunks(memory: Memory, seq_id: int, n_prefix: int, cached: np.ndarray,
                 prompt: np.ndarray, n_keep: int, n_min: int) -> tuple[int, np.ndarray]:
    """Shift the cached chunks the prompt continues with into place after its first n_keep
    tokens. Returns the prompt tokens the sequence now holds from the start (n_keep plus the
    chunks moved) and the cached tokens with those chunks moved (the tail is stale)."""
    cached = cached.copy()
    head_c = head_p = n_keep
    n_past = n_keep
    n_c, n_p = len(cached), len(prompt)
    while head_c < n_c and head_p < n_p:
        n = 0
        while head_c + n < n_c and head_p + n < n_p and cached[head_c + n] == prompt[head_p + n]:
            n += 1
        if n >= n_min:
            log.debug("seq %d: reusing a chunk of %d tokens, KV [%d, %d) -> [%d, %d)",
                      seq_id, n, head_c, head_c + n, head_p, head_p + n)
            memory.seq_rm(seq_id, n_prefix + head_p, n_prefix + head_c)
            memory.seq_add(seq_id, n_prefix + head_c, n_prefix + head_c + n, head_p - head_c)
            cached[head_p:head_p + n] = cached[head_c:head_c + n]
            n_past += n
            head_c += n
            head_p += n
        else:
            head_c += 1
    return n_past, cached
