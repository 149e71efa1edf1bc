"""POST /v1/embeddings (OpenAI) and /embedding, /embeddings (llama-server): the request's fields
and the answer's shape, as llama-server v0.5.0 has them (tools/server/server-context.cpp,
handle_embeddings_impl). The vectors come from the engine (Engine.submit_embedding).

    OpenAI:  {"input": str | [int] | [str | [int]], "encoding_format": "float"|"base64",
              "model": ..., "embd_normalize": N}
             -> {"object": "list", "model", "data": [{"object": "embedding", "index", "embedding"}],
                 "usage": {"prompt_tokens", "total_tokens"}}
    llama-server: {"content": ...} (or "input" on /embedding)
             -> [{"index": i, "embedding": [[...]]}]  (pooling none: one vector per token)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from .errors import ApiError, bad_request

NOT_ENABLED = "This server does not support embeddings. Start it with `--embeddings`"
NONE_NOT_OAI = "Pooling type 'none' is not OAI compatible. Please use a different pooling type"
EMPTY = "Input content cannot be empty"


@dataclass
class EmbeddingJob:
    inputs: list                  # strings and token-id lists, one per input
    oai: bool                     # OpenAI's answer shape
    base64: bool
    normalize: int | None         # None: --embd-normalize
    model: str | None


def parse_embedding(body, oai_route: bool, pooling_none: bool, n_vocab: int) -> EmbeddingJob:
    """The job a request body asks for, or ApiError (400) with llama-server's message."""
    if oai_route and pooling_none:
        raise bad_request(NONE_NOT_OAI)
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    oai = oai_route
    if "input" in body:
        raw = body["input"]
    elif "content" in body:
        raw, oai = body["content"], False  # "content" is not OpenAI's: llama-server's shape
    else:
        raise bad_request('"input" or "content" must be provided')
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request("The format to return the embeddings in. Can be either float or base64")
    norm = body.get("embd_normalize")
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, int)):
        raise bad_request("embd_normalize must be an integer (-1 none, 0 max absolute, 1 taxicab, "
                          "2 euclidean, >2 p-norm)")
    model = body.get("model")
    return EmbeddingJob(_inputs(raw, n_vocab), oai, fmt == "base64", norm,
                        model if isinstance(model, str) else None)


def _inputs(raw, n_vocab: int) -> list:
    """llama-server's prompt shapes: a string, a token-id list, or a list of strings and
    token-id lists (each one input)."""
    if isinstance(raw, str) or _is_tokens(raw):
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise bad_request('"input" must be a string, a list of token ids, or a list of those')
    if not items:
        raise bad_request(EMPTY)
    for x in items:
        if isinstance(x, str):
            if not x:
                raise bad_request(EMPTY)
        elif _is_tokens(x):
            bad = [t for t in x if not 0 <= t < n_vocab]
            if bad:
                raise bad_request(f"token id {bad[0]} is out of range: ids must be in 0..{n_vocab - 1}")
        elif isinstance(x, list) and not x:
            raise bad_request(EMPTY)
        else:
            raise bad_request("each input must be a string or a list of token ids")
    return items


def _is_tokens(x) -> bool:
    return (isinstance(x, list) and len(x) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in x))


def answer(job: EmbeddingJob, vectors: list[np.ndarray], n_tokens: list[int], model_name: str):
    """The response body for computed vectors (rows per input, in input order)."""
    if not job.oai:
        return [{"index": i, "embedding": (v if v.ndim == 2 else v[None, :]).tolist()}
                for i, v in enumerate(vectors)]
    data = []
    for i, v in enumerate(vectors):
        if job.base64:
            enc = base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
            data.append({"embedding": enc, "index": i, "object": "embedding", "encoding_format": "base64"})
        else:
            data.append({"embedding": v.tolist(), "index": i, "object": "embedding"})
    n = int(sum(n_tokens))
    return {"model": job.model or model_name, "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n}, "data": data}


def refuse_not_enabled() -> ApiError:
    return ApiError(501, "not_supported_error", NOT_ENABLED)
