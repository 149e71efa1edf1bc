"""The pieces every wire format uses, built from an engine `Request` handle: llama-server's
/completion result object (OpenAI's answers carry it as "__verbose"), timings, usage,
generation_settings, per-token probabilities, and why a handle failed."""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, Callable, Sequence

from llama_lib import FinishReason, Progress, RequestParams

from ...errors import ApiError
from ..job import Job



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


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")[:32]


def timings_json(cache_n: int, prompt_n: int, prompt_ms: float, predicted_n: int,
                 predicted_ms: float) -> dict:
    """llama-server's `timings` object from its counts and durations."""
    # as llama-server: the first token comes from the prompt's logits and costs no decode
    # step, so the generation rate is over n - 1 steps (0 for a single token)
    steps = max(0, predicted_n - 1)
    return {
        "cache_n": cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / (prompt_ms / 1000.0) if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / steps if steps and predicted_ms > 0 else 0.0,
        "predicted_per_second": 1e3 / predicted_ms * steps if predicted_ms > 0 else 0.0,
    }


def timings(h, n_predicted: int | None = None) -> dict:
    """llama-server's `timings` object from an engine Request handle: when it finished, or
    (timings_per_token) while it runs, after its first `n_predicted` tokens."""
    t = h.timings
    if t.done:
        end = t.done
    elif t.prompt_done:
        end = time.perf_counter()
    else:
        end = 0.0
    predicted_ms = max(0.0, end - t.prompt_done) * 1000.0 if end else 0.0
    n_pred = h.n_generated if n_predicted is None else n_predicted
    out = timings_json(h.n_cached_tokens, h.n_prompt_tokens, t.prompt_s * 1000.0, n_pred, predicted_ms)
    if getattr(t, "draft_n", 0) > 0:  # as llama-server: only when something was drafted
        out["draft_n"], out["draft_n_accepted"] = t.draft_n, t.draft_n_accepted
    return out


def progress_json(p: Progress) -> dict:
    """llama-server's `prompt_progress` (return_progress): counts of the whole prompt."""
    return {"total": p.total, "cache": p.cache, "processed": p.processed, "time_ms": int(p.time_ms)}


def progress_timings(p: Progress) -> dict:
    """The `timings` of a progress event (timings_per_token): the prompt so far, nothing
    generated; 0 ms before any prompt token is decoded, as llama-server."""
    n = p.processed - p.cache
    return timings_json(p.cache, n, p.time_ms if n else 0.0, 0, 0.0)


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


def generation_settings(p: RequestParams, n_ctx: int, stream: bool,
                        timings_per_token: bool = False) -> dict:
    """llama-server's generation_settings, every sampler field with the value in force."""
    s = p.sampling
    return {
        "n_ctx": n_ctx,
        "n_predict": p.n_predict,
        "max_tokens": p.n_predict,
        "seed": 0xFFFFFFFF if s.seed is None else s.seed,
        "temperature": s.temperature,
        "dynatemp_range": s.dynatemp_range,
        "dynatemp_exponent": s.dynatemp_exponent,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "top_n_sigma": s.top_n_sigma,
        "xtc_probability": s.xtc_probability,
        "xtc_threshold": s.xtc_threshold,
        "typical_p": s.typical_p,
        "repeat_last_n": s.repeat_last_n,
        "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "dry_multiplier": s.dry_multiplier,
        "dry_base": s.dry_base,
        "dry_allowed_length": s.dry_allowed_length,
        "dry_penalty_last_n": s.dry_penalty_last_n,
        "dry_sequence_breakers": list(s.dry_sequence_breakers),
        "mirostat": s.mirostat,
        "mirostat_tau": s.mirostat_tau,
        "mirostat_eta": s.mirostat_eta,
        "adaptive_target": s.adaptive_target,
        "adaptive_decay": s.adaptive_decay,
        "stop": list(p.stop),
        "ignore_eos": p.ignore_eos,
        "stream": stream,
        "logit_bias": format_logit_bias(s.logit_bias),
        "min_keep": s.min_keep,
        "n_probs": p.n_probs,
        "samplers": list(s.samplers),
        "n_keep": p.n_keep,
        "n_discard": p.n_discard,
        "grammar": s.grammar or "",
        "grammar_lazy": s.grammar_lazy,
        "grammar_triggers": [],
        "preserved_tokens": [],
        "chat_format": "Content-only",
        "reasoning_format": "none",
        "reasoning_in_content": False,
        "generation_prompt": "",
        "timings_per_token": timings_per_token,
        "post_sampling_probs": p.post_sampling_probs,
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
        "generation_settings": generation_settings(job.params, n_ctx, job.stream, job.timings_per_token),
        "prompt": prompt_text,
        "has_new_line": "\n" in h.text,
        "truncated": h.truncated,
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


# llama-server writes the lowest float for log(0) (JSON has no -inf)
_LOGPROB_MIN = -3.4028234663852886e38


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_MIN


def probs_json(entries: Sequence[Any], piece: Callable[[int], bytes],
               strip_leading: bool = False, post: bool = False) -> list[dict]:
    """llama-server's completion_probabilities / OpenAI's logprobs.content: per generated token
    (engine `TokenProbs`) its id, the text sent with it ("token", with "bytes"), its logprob
    and its top_logprobs (each candidate's text is its piece; `piece(id)` gives the bytes).

    `strip_leading`: the answer's text had its leading whitespace dropped; the first
    entries' texts are stripped alike, so that the tokens still spell the answer. `post`:
    llama-server's post_sampling_probs keys, "prob" and "top_probs" (probabilities, not logs)."""
    key, top_key = ("prob", "top_probs") if post else ("logprob", "top_logprobs")
    value = math.exp if post else _logprob
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
                        key: value(lp)})
        out.append({"id": e.token, "token": text, "bytes": list(text.encode("utf-8")),
                    key: value(e.logprob), top_key: top})
    return out


# -- the answer of one finished handle --------------------------------------------------------

def handle_error(h, closing: bool) -> ApiError:
    """Why a handle failed: the server shutting down (503), else the engine's error (500)."""
    if h.finish_reason == FinishReason.CANCELLED and closing:
        return ApiError(503, "unavailable_error", "the server is shutting down")
    return ApiError(500, "server_error", h.error or "the request was cancelled")


def final_probs(h, job: Job, piece: Callable[[int], bytes],
                tokenize_text: Callable[[str], list[int]], post: bool = False) -> list[dict]:
    """The per-token probabilities of a finished (not streamed) request. After a stop
    string, as llama-server, the last entries are dropped, at most as many as the stop
    string has tokens (those that spelled it); here only those that sent no text, so
    that the entries still spell the answer."""
    entries = h.probs
    if h.finish_reason == FinishReason.STOP and h.stopping_word:
        n = len(entries)
        lo = max(0, n - len(tokenize_text(h.stopping_word)))
        while n > lo and not entries[n - 1].text:
            n -= 1
        entries = entries[:n]
    return probs_json(entries, piece, job.strip_leading, post)
