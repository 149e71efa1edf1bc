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

from ..errors import ApiError, bad_request
from ..fields import check_body

NOT_ENABLED = "This server does not support embeddings. Start it with `--embeddings`"
NONE_NOT_OAI = "Pooling type 'none' is not OAI compatible. Please use a different pooling type"


@dataclass
class EmbeddingJob:
    inputs: object                # "input"/"content" as sent: a string, token ids, a list of those
    oai: bool                     # OpenAI's answer shape
    base64: bool
    normalize: int | None         # None: --embd-normalize
    model: str | None


def parse_embedding(body, oai_route: bool, pooling_none: bool) -> EmbeddingJob:
    """The job a request body asks for, or ApiError (400) with llama-server's message. The
    inputs' shapes (a string, token ids, a list of those) are checked by the engine's
    submit_embedding, whose ValueError is a 400 too."""
    if oai_route and pooling_none:
        raise bad_request(NONE_NOT_OAI)
    check_body(body)
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
    return EmbeddingJob(raw, oai, fmt == "base64", norm,
                        model if isinstance(model, str) else None)


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
