"""The host-RAM tier carried over a reload: its entries written to a file when the model is
freed (a router unloading it, sleeping on idle) and read back into a new engine of the same
model and settings, so that a returning conversation finds its KV state without decoding its
history again.

`export_entries` runs on the engine thread (Engine.call): every slot that holds a prompt cache
is saved into the tier first, then the tier's entries are taken as they are (tokens after the
system prefix, the prefix's length, llama_state_seq_get_data's bytes). `import_entries` puts
them into a new engine's tier (an entry whose system prefix differs from the new engine's is
left out). The file: a magic line, one JSON line describing the entries, then each entry's
int32 tokens and state bytes. A state that does not fit the new context is dropped when a slot
tries to load it (ram_tier.RamTier.load), never half-loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

MAGIC = b"pyllama-ram-tier 1\n"


@dataclass
class Saved:
    tokens: np.ndarray  # after the system prefix
    n_prefix: int
    data: bytes


def _engines(engine) -> list:
    return list(getattr(engine, "engines", None) or [engine])


def export_entries(engine, timeout: float | None = 60.0) -> tuple[np.ndarray, list[Saved]]:
    """(the system prompt tokens, every entry of the tier(s) with the slots' caches added)."""
    def take(e):
        cache = e.cache
        if cache.ram_tier is None:
            return []
        for s in e.slots:
            cache.save_to_ram(s)
        return [Saved(x.tokens.copy(), x.n_prefix, x.data) for x in cache.ram.entries
                if x.n_prefix == 0 or x.prefix_version == cache.system.version]
    out = [x for e in _engines(engine) for x in e.call(lambda e=e: take(e), timeout)]
    return np.asarray(_engines(engine)[0].system_tokens, dtype=np.int32), out


def import_entries(engine, system_tokens: np.ndarray, entries: list[Saved],
                   timeout: float | None = 60.0) -> int:
    """Put saved entries into `engine`'s tier(s), spread over a pool's engines; returns how many
    were kept (an entry after another system prompt, or over the tier's limit, is not)."""
    engines = _engines(engine)
    same_prefix = np.array_equal(np.asarray(engines[0].system_tokens, dtype=np.int32), system_tokens)

    def put(e, items):
        cache = e.cache
        if cache.ram is None:
            return 0
        return sum(cache.ram.put(x.tokens, x.n_prefix, cache.system.version, x.data) for x in items
                   if x.n_prefix == 0 or (same_prefix and x.n_prefix == len(system_tokens)))
    return sum(e.call(lambda e=e, i=i: put(e, entries[i::len(engines)]), timeout)
               for i, e in enumerate(engines))


def n_bytes(entries: list[Saved]) -> int:
    return sum(len(x.data) + 4 * len(x.tokens) for x in entries)


def write_file(path: str, system_tokens: np.ndarray, entries: list[Saved]) -> int:
    """Write atomically (a temporary name, then renamed); returns the bytes written."""
    head = {"system_tokens": [int(t) for t in system_tokens],
            "entries": [{"n_tokens": len(x.tokens), "n_prefix": x.n_prefix, "n_data": len(x.data)}
                        for x in entries]}
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(json.dumps(head).encode() + b"\n")
        for x in entries:
            f.write(np.asarray(x.tokens, dtype="<i4").tobytes())
            f.write(x.data)
        size = f.tell()
    os.replace(tmp, path)
    return size


def read_file(path: str) -> tuple[np.ndarray, list[Saved]]:
    """Raises ValueError for a file that is not one of ours (or is cut short)."""
    with open(path, "rb") as f:
        if f.readline() != MAGIC:
            raise ValueError(f"{path}: not a saved prompt cache")
        head = json.loads(f.readline())
        out = []
        for e in head["entries"]:
            raw = f.read(4 * e["n_tokens"])
            data = f.read(e["n_data"])
            if len(raw) != 4 * e["n_tokens"] or len(data) != e["n_data"]:
                raise ValueError(f"{path}: cut short")
            out.append(Saved(np.frombuffer(raw, dtype="<i4").astype(np.int32), e["n_prefix"], data))
    return np.asarray(head["system_tokens"], dtype=np.int32), out
