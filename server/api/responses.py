"""Response shapes: llama-server's /completion objects and OpenAI's text_completion /
chat.completion(.chunk) objects, built from an engine `Request` handle.

`result()` is the whole answer of one finished handle; the builders below it are the pieces
that the stream (server.events) and the merge of several choices (server.fanout) use too.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Protocol, Sequence

from llama_lib import FinishReason, RequestParams

from .. import __version__
from ..chat.output import ChatOutput
from ..errors import ApiError
from .requests import KIND_COMPLETION, KIND_OAI_CHAT, Job

# OpenAI's `system_fingerprint`: llama-server sends its build, "b<build number>-<commit>", and
# clients (the upstream tests, some SDK users) check that it starts with "b".
SYSTEM_FINGERPRINT = f"b0-pyllama-{__version__}"


class Answerer(Protocol):
    """What building an answer needs from the running server (server.service.Service)."""

    model_name: str

    @property
    def n_ctx_slot(self) -> int: ...

    def prompt_text(self, h, job: Job) -> str:
        """The prompt as decoded, special tokens written out."""

    def tokenize_text(self, text: str) -> list[int]: ...

    def token_piece(self, token: int) -> bytes: ...


def piece_json(piece: bytes) -> str | list[int]:
    """llama-server's `with_pieces`: the text, or the bytes when they are not valid UTF-8."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


STOP_TYPE = {
    FinishReason.EOS: "eos",
    FinishReason.STOP: "word",
    FinishReason.LENGTH: "limit",
    FinishReason.CANCELLED: "none",
    FinishReason.ERROR: "none",
}


def oai_finish_reason(reason: FinishReason | None) -> str | None:
    if reason in (FinishReason.EOS, FinishReason.STOP):
        return "stop"
    if reason == FinishReason.LENGTH:
        return "length"
    return None


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")[:32]


def timings(h) -> dict:
    """llama-server's `timings` object from an engine Request handle."""
    t = h.timings
    prompt_ms = t.prompt_s * 1000.0
    predicted_ms = max(0.0, t.done - t.prompt_done) * 1000.0 if t.done else 0.0
    n_prompt, n_pred = h.n_prompt_tokens, h.n_generated
    # as llama-server: the first token comes from the prompt's logits and costs no decode
    # step, so the generation rate is over n - 1 steps (0 for a single token)
    steps = max(0, n_pred - 1)
    return {
        "cache_n": h.n_cached_tokens,
        "prompt_n": n_prompt,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
        "prompt_per_second": n_prompt / (prompt_ms / 1000.0) if prompt_ms > 0 else 0.0,
        "predicted_n": n_pred,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / steps if steps and predicted_ms > 0 else 0.0,
        "predicted_per_second": 1e3 / predicted_ms * steps if predicted_ms > 0 else 0.0,
    }


def usage(h) -> dict:
    n_prompt = h.n_cached_tokens + h.n_prompt_tokens
    return {
        "completion_tokens": h.n_generated,
        "prompt_tokens": n_prompt,
        "total_tokens": n_prompt + h.n_generated,
        "prompt_tokens_details": {"cached_tokens": h.n_cached_tokens},
    }


def format_logit_bias(bias: dict[int, float]) -> list[dict]:
    """llama-server's list of {"bias", "token"}; a ban (-inf) is null, as its JSON writes it."""
    return [{"bias": b if math.isfinite(b) else None, "token": t} for t, b in bias.items()]


def generation_settings(p: RequestParams, n_ctx: int, stream: bool) -> dict:
    """llama-server's generation_settings. The samplers we do not have are listed with the
    values that disable them (what llama.cpp defaults to), so clients find every field."""
    s = p.sampling
    return {
        "n_ctx": n_ctx,
        "n_predict": p.n_predict,
        "max_tokens": p.n_predict,
        "seed": 0xFFFFFFFF if s.seed is None else s.seed,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "typical_p": s.typical_p,
        "repeat_last_n": s.repeat_last_n,
        "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "stop": list(p.stop),
        "ignore_eos": p.ignore_eos,
        "stream": stream,
        "logit_bias": format_logit_bias(s.logit_bias),
        "min_keep": 0,
        "n_probs": p.n_probs,
        "samplers": ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"],
        # not implemented here: the values that turn them off
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"],
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "adaptive_target": -1.0,
        "adaptive_decay": 0.9,
        "n_keep": 0,
        "n_discard": 0,
        "grammar": s.grammar or "",
        "grammar_lazy": s.grammar_lazy,
        "grammar_triggers": [],
        "preserved_tokens": [],
        "chat_format": "Content-only",
        "reasoning_format": "none",
        "reasoning_in_content": False,
        "generation_prompt": "",
        "timings_per_token": False,
        "post_sampling_probs": False,
        "backend_sampling": False,
        "lora": [],
    }


def completion_result(h, job: Job, model: str, n_ctx: int, content: str,
                      prompt_text: str | None = None, index: int = 0) -> dict:
    """llama-server's final /completion object (streamed last with content "" and no tokens).

    `prompt_text` is the prompt as decoded (llama-server shows its tokens detokenized, with
    the special ones); without it the request's prompt string. Not projected: see
    `project_fields` (the OpenAI shapes embed the whole object as "__verbose")."""
    tokens_evaluated = h.n_cached_tokens + h.n_prompt_tokens
    if prompt_text is None:
        prompt_text = job.prompt if isinstance(job.prompt, str) else ""
    return {
        "index": index,
        "content": content,
        "tokens": [int(t) for t in h.tokens] if job.return_tokens and not job.stream else [],
        "id_slot": h.slot_id,
        "stop": True,
        "model": model,
        "tokens_predicted": h.n_generated,
        "tokens_evaluated": tokens_evaluated,
        "generation_settings": generation_settings(job.params, n_ctx, job.stream),
        "prompt": prompt_text,
        "has_new_line": "\n" in h.text,
        "truncated": False,
        "stop_type": STOP_TYPE.get(h.finish_reason, "none"),
        "stopping_word": h.stopping_word,
        "tokens_cached": tokens_evaluated + h.n_generated,
        "timings": timings(h),
    }


def project_fields(res: dict, fields: Sequence[str]) -> dict:
    """llama-server's `response_fields`: only these fields, "a/b" reads res["a"]["b"] and is
    put under the key "a/b"; missing ones are left out. No fields: the whole object."""
    if not fields:
        return res
    out = {}
    for path in fields:
        cur: Any = res
        for key in path.split("/"):
            if not isinstance(cur, dict) or key not in cur:
                break
            cur = cur[key]
        else:
            out[path] = cur
    return out


def completion_chunk(h, text: str, tokens: list[int], n_predicted: int, index: int = 0) -> dict:
    return {
        "index": index,
        "content": text,
        "tokens": tokens,
        "stop": False,
        "id_slot": h.slot_id,
        "tokens_predicted": n_predicted,
        "tokens_evaluated": h.n_cached_tokens + h.n_prompt_tokens,
    }


# llama-server writes the lowest float for log(0) (JSON has no -inf)
_LOGPROB_MIN = -3.4028234663852886e38


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_MIN


def probs_json(entries: Sequence[Any], piece: Callable[[int], bytes],
               strip_leading: bool = False) -> list[dict]:
    """llama-server's completion_probabilities / OpenAI's logprobs.content: per generated token
    (engine `TokenProbs`) its id, the text sent with it ("token", with "bytes"), its logprob
    and its top_logprobs (each candidate's text is its piece; `piece(id)` gives the bytes).

    `strip_leading`: the answer's text had its leading whitespace dropped; the first
    entries' texts are stripped alike, so that the tokens still spell the answer."""
    out = []
    strip = strip_leading
    for e in entries:
        text = e.text
        if strip:
            text = text.lstrip()
            strip = not text
        top = []
        for tid, lp in e.top:
            b = piece(tid)
            top.append({"id": tid, "token": b.decode("utf-8", "ignore"), "bytes": list(b),
                        "logprob": _logprob(lp)})
        out.append({"id": e.token, "token": text, "bytes": list(text.encode("utf-8")),
                    "logprob": _logprob(e.logprob), "top_logprobs": top})
    return out


def _oai_head(job: Job, model: str, obj: str) -> dict:
    return {"id": job.id, "object": obj, "created": job.created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT}


def chat_finish_reason(h, has_calls: bool) -> str | None:
    """A chat's finish_reason: "tool_calls" when the answer is calls (unless cut by length)."""
    reason = oai_finish_reason(h.finish_reason)
    return "tool_calls" if has_calls and reason == "stop" else reason


def _oai_answer(h, job: Job, model: str, obj: str, choice: dict, verbose: dict | None,
                finish_reason: str | None = None) -> dict:
    """A whole OpenAI answer: one choice, usage, "__verbose" (the /completion object) when the
    job asked for it, then llama-server's timings."""
    out = _oai_head(job, model, obj)
    out["choices"] = [{**choice, "logprobs": None,
                       "finish_reason": finish_reason or oai_finish_reason(h.finish_reason)}]
    out["usage"] = usage(h)
    if verbose is not None:
        out["__verbose"] = verbose
    out["timings"] = timings(h)
    return out


def oai_completion(h, job: Job, model: str, text: str, verbose: dict | None = None,
                   index: int = 0) -> dict:
    return _oai_answer(h, job, model, "text_completion", {"text": text, "index": index}, verbose)


def oai_completion_chunk(job: Job, model: str, text: str, finish_reason: str | None = None,
                         index: int = 0) -> dict:
    out = _oai_head(job, model, "text_completion")
    out["choices"] = [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]
    return out


def oai_chat(h, job: Job, model: str, text: str, verbose: dict | None = None,
             index: int = 0) -> dict:
    if job.chat is None:
        message = {"role": "assistant", "content": text}
        return _oai_answer(h, job, model, "chat.completion", {"index": index, "message": message}, verbose)
    message = ChatOutput(job.chat).message(text)
    reason = chat_finish_reason(h, "tool_calls" in message)
    return _oai_answer(h, job, model, "chat.completion", {"index": index, "message": message}, verbose, reason)


def oai_chat_chunk(job: Job, model: str, delta: dict, finish_reason: str | None = None,
                   index: int = 0) -> dict:
    out = _oai_head(job, model, "chat.completion.chunk")
    out["choices"] = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return out


def oai_usage_chunk(h, job: Job, model: str) -> dict:
    """The last chunk of a chat stream with stream_options.include_usage: no choices."""
    out = _oai_head(job, model, "chat.completion.chunk")
    out["choices"] = []
    out["usage"] = usage(h)
    out["timings"] = timings(h)
    return out


# -- the answer of one finished handle --------------------------------------------------------

def handle_error(h, closing: bool) -> ApiError:
    """Why a handle failed: the server shutting down (503), else the engine's error (500)."""
    if h.finish_reason == FinishReason.CANCELLED and closing:
        return ApiError(503, "unavailable_error", "the server is shutting down")
    return ApiError(500, "server_error", h.error or "the request was cancelled")


def result(srv: Answerer, h, job: Job, text: str, index: int = 0) -> dict:
    """The non-streamed answer of one finished handle, in the job's shape."""
    res = completion_result(h, job, srv.model_name, srv.n_ctx_slot, text, srv.prompt_text(h, job), index)
    probs = final_probs(srv, h, job) if job.params.n_probs > 0 else []
    if probs:
        res["completion_probabilities"] = probs
    if job.kind == KIND_COMPLETION:
        return project_fields(res, job.response_fields)
    verbose = res if job.verbose else None
    if job.kind == KIND_OAI_CHAT:
        out = oai_chat(h, job, srv.model_name, text, verbose, index)
    else:
        out = oai_completion(h, job, srv.model_name, text, verbose, index)
    if probs:
        out["choices"][0]["logprobs"] = {"content": probs}
    return out


def final_probs(srv: Answerer, h, job: Job) -> list[dict]:
    """The per-token probabilities of a finished (not streamed) request. After a stop
    string, as llama-server, the last entries are dropped, at most as many as the stop
    string has tokens (those that spelled it); here only those that sent no text, so
    that the entries still spell the answer."""
    entries = h.probs
    if h.finish_reason == FinishReason.STOP and h.stopping_word:
        n = len(entries)
        lo = max(0, n - len(srv.tokenize_text(h.stopping_word)))
        while n > lo and not entries[n - 1].text:
            n -= 1
        entries = entries[:n]
    return probs_json(entries, srv.token_piece, job.strip_leading)
