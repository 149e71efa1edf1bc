"""`--models-memory MiB` (ours): what a model will take before it is loaded, from its GGUF header
and its child's flags, so that the router unloads least-recently-used models until it fits, or
refuses it with the figures, instead of letting the machine swap.

The estimate, in MiB: the GGUF files (weights, mapped and touched while decoding), plus the KV
cache (layers x cells x KV heads x (key + value length) x the cache type's bytes; cells as our
server sizes them: -c split over the slots plus one sequence for the shared system prompt, or
the training context with -c 0), plus the compute and output buffers (a ubatch's activations and
a logits row per slot) and the child's Python process (BASE_MIB). Sliding-window layers are
counted as full ones: an upper bound. Measured against RSS in docs/router.md.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

BASE_MIB = 110  # a child's interpreter, imports and libllama before any model (RSS, measured)
# bytes per element of the KV cache types (ggml type ids, as --cache-type-k/-v store them)
KV_TYPE_BYTES = {0: 4.0, 1: 2.0, 30: 2.0, 2: 18 / 32, 3: 20 / 32, 6: 22 / 32, 7: 24 / 32, 8: 34 / 32, 20: 18 / 32}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class GgufShape:
    file_bytes: int
    n_layer: int
    n_embd: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    n_ctx_train: int


def _read(f, fmt: str):
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _skip_value(f, t: int) -> None:
    if t in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[t]), 1)
    elif t == 8:
        f.seek(_read(f, "<Q"), 1)
    elif t == 9:
        et, n = _read(f, "<I"), _read(f, "<Q")
        if et in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[et]) * n, 1)
        else:
            for _ in range(n):
                _skip_value(f, et)
    else:
        raise ValueError(f"unknown GGUF value type {t}")


def read_shape(path: str) -> GgufShape:
    """The header values the estimate needs (reading stops once it has them). Raises ValueError
    for a file that is not GGUF."""
    kv: dict[str, object] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _read(f, "<I")
        _read(f, "<Q")
        n_kv = _read(f, "<Q")
        for _ in range(n_kv):
            key = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            t = _read(f, "<I")
            if key == "tokenizer.ggml.tokens" and t == 9:
                _read(f, "<I")
                kv[key] = _read(f, "<Q")
                break  # the architecture's keys come before the tokenizer's
            if t in _SCALARS:
                kv[key] = _read(f, _SCALARS[t])
            elif t == 8:
                kv[key] = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            else:
                _skip_value(f, t)
    arch = kv.get("general.architecture", "")

    def get(name: str, default: int = 0) -> int:
        v = kv.get(f"{arch}.{name}", default)
        return int(v) if isinstance(v, (int, float)) else default

    n_embd, n_head = get("embedding_length"), get("attention.head_count", 1)
    head_dim = n_embd // max(1, n_head)
    folder, name = os.path.split(path)
    size = os.path.getsize(path)
    if "-00001-of-" in name:  # every shard of a split model
        stem = name.split("-00001-of-")[0]
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder or ".")
                   if n.startswith(stem + "-") and "-of-" in n and n.endswith(".gguf"))
    return GgufShape(size, get("block_count"), n_embd, get("attention.head_count_kv", n_head),
                     get("attention.key_length", head_dim), get("attention.value_length", head_dim),
                     int(kv.get("tokenizer.ggml.tokens", 32000)), get("context_length", 4096))


def estimate_mib(shape: GgufShape, args) -> float:
    """MiB a child serving this model with these parsed flags (server.config.cli) will hold."""
    n_par = max(1, args.parallel)
    total = args.ctx_size or shape.n_ctx_train
    cells = max(64, total) if args.kv_unified else max(32, total // n_par) * (n_par + 1)
    kv = shape.n_layer * cells * shape.n_head_kv * (
        shape.key_length * KV_TYPE_BYTES.get(args.cache_type_k, 2.0)
        + shape.value_length * KV_TYPE_BYTES.get(args.cache_type_v, 2.0))
    compute = args.ubatch_size * shape.n_embd * 4 * 24 + shape.n_vocab * 4 * (n_par + 1)
    if args.embedding:  # a second context for embeddings
        compute *= 2
    return BASE_MIB + (shape.file_bytes + kv + compute) / 2**20
