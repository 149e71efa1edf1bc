"""Request validation and response shapes: pure functions, no sockets and no model.

Every request body goes through one parser here (`parse_completion`, `parse_chat`,
`parse_tokenize`, `parse_detokenize`), which either returns a `Job` / plain values or raises
`ApiError`, which the HTTP layer turns into llama-server's error shape:

    {"error": {"code": 400, "message": "...", "type": "invalid_request_error"}}

The response builders at the bottom write llama-server's `/completion` objects and OpenAI's
`text_completion` / `chat.completion(.chunk)` objects from a finished (or running) engine
`Request` handle.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from llama_lib import FinishReason, RequestParams, SamplingParams, apply_chat_template

# -- errors -----------------------------------------------------------------------------------

ERROR_STATUS = {
    "invalid_request_error": 400,
    "exceed_context_size_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "server_error": 500,
    "not_supported_error": 501,
    "unavailable_error": 503,
}


class ApiError(Exception):
    """An error answered as JSON: status code, llama-server error type, message, extra fields."""

    def __init__(self, status: int, type_: str, message: str, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.type, self.message, self.extra)


def error_body(status: int, type_: str, message: str, extra: dict | None = None) -> dict:
    err = {"code": status, "message": message, "type": type_}
    if extra:
        err.update(extra)
    return {"error": err}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


# -- field readers ----------------------------------------------------------------------------

_MISSING = object()


def _get(body: dict, *names: str) -> Any:
    """The first of `names` present in body and not null, else _MISSING."""
    for n in names:
        v = body.get(n, None)
        if v is not None:
            return v
    return _MISSING


def get_int(body: dict, name: str, default: int, lo: int | None = None, hi: int | None = None,
            aliases: Sequence[str] = ()) -> int:
    """The first of name / aliases present (not null); every one present must be valid."""
    out = _MISSING
    for n in (name, *aliases):
        v = body.get(n, None)
        if v is None:
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_request(f"'{n}' must be an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                f">= {lo}" if lo is not None else f"<= {hi}")
            raise bad_request(f"'{n}' must be {rng}")
        if out is _MISSING:
            out = v
    return default if out is _MISSING else out


def get_float(body: dict, name: str, default: float, lo: float | None = None,
              hi: float | None = None) -> float:
    v = _get(body, name)
    if v is _MISSING:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number")
    v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad_request(f"'{name}' must be between {lo} and {hi}")
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = _get(body, name)
    if v is _MISSING:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be true or false")
    return v


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    v = _get(body, name)
    if v is _MISSING:
        return default
    if not isinstance(v, str):
        raise bad_request(f"'{name}' must be a string")
    return v


def get_stop(body: dict) -> list[str]:
    v = _get(body, "stop")
    if v is _MISSING:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 64:
            raise bad_request("'stop' holds at most 64 strings")
        return [s for s in v if s]
    raise bad_request("'stop' must be a string or a list of strings")


def get_logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's {"token id": bias} or llama-server's [[token id, bias | false], ...]."""
    v = _get(body, "logit_bias")
    if v is _MISSING:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, list):
        pairs = []
        for p in v:
            if not (isinstance(p, list) and len(p) == 2):
                raise bad_request("'logit_bias' as a list must hold [token id, bias] pairs")
            pairs.append((p[0], p[1]))
    else:
        raise bad_request("'logit_bias' must be an object {token id: bias} or a list of pairs")
    out: dict[int, float] = {}
    for tok, bias in pairs:
        if isinstance(tok, str):
            try:
                tok = int(tok)
            except ValueError:
                raise bad_request(f"'logit_bias' key {tok[:20]!r} is not a token id") from None
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise bad_request("'logit_bias' keys must be token ids (integers)")
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise bad_request("'logit_bias' values must be finite numbers (or false to ban a token)")
        out[tok] = float(bias)
    return out


# -- jobs -------------------------------------------------------------------------------------

# How a job answers: llama-server's /completion shape, or OpenAI's two shapes.
KIND_COMPLETION = "completion"
KIND_OAI_COMPLETION = "oai_completion"
KIND_OAI_CHAT = "oai_chat"


@dataclass
class Defaults:
    """Server-wide defaults a request may override (from the command line)."""

    n_predict: int = -1
    temperature: float = 0.8
    seed: int = -1
    n_vocab: int = 1 << 30


@dataclass
class SystemUpdate:
    """server-parallel's fields: a new shared system prompt and the names around it."""

    system_prompt: str
    anti_prompt: str
    assistant_name: str


@dataclass
class Job:
    kind: str
    prompt: str | list[int]
    params: RequestParams
    stream: bool = False
    system_update: SystemUpdate | None = None
    # extra stop strings the server adds (anti-prompts, the chat fallback's turn marker)
    add_server_stops: bool = True
    extra_stops: list[str] = field(default_factory=list)
    strip_leading: bool = False  # chat with the transcript fallback: drop the space after "Assistant:"
    include_usage: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""


def _sampling(body: dict, d: Defaults) -> SamplingParams:
    seed = get_int(body, "seed", d.seed, lo=-1, hi=2**32 - 1)
    return SamplingParams(
        temperature=get_float(body, "temperature", d.temperature, 0.0, 100.0),
        top_k=get_int(body, "top_k", 40, lo=0, hi=1 << 30),
        top_p=get_float(body, "top_p", 0.95, 0.0, 1.0),
        min_p=get_float(body, "min_p", 0.05, 0.0, 1.0),
        typical_p=get_float(body, "typical_p", 1.0, 0.0, 1.0),
        repeat_penalty=get_float(body, "repeat_penalty", 1.0, 1e-6, 10.0),
        repeat_last_n=get_int(body, "repeat_last_n", 64, lo=-1, hi=1 << 20),
        frequency_penalty=get_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=get_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        seed=None if seed == -1 else seed,
        logit_bias=get_logit_bias(body),
    )


def _check_logit_bias(sp: SamplingParams, n_vocab: int) -> None:
    for tok in sp.logit_bias:
        if not 0 <= tok < n_vocab:
            raise bad_request(f"'logit_bias' token {tok} is outside the vocabulary (0..{n_vocab - 1})")


def _prompt(body: dict, n_vocab: int, name: str = "prompt") -> str | list[int]:
    """A string, a list of token ids, or a one-element list of either (one prompt only).
    Never empty: llama-server would generate from BOS alone; we refuse (400)."""
    v = body.get(name, None)
    if v is None:
        raise bad_request(f"'{name}' is required")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        if not v:
            raise bad_request(f"'{name}' is empty")
        return v
    if isinstance(v, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if not v:
                raise bad_request(f"'{name}' is empty")
            for t in v:
                if not 0 <= t < n_vocab:
                    raise bad_request(f"'{name}' token id {t} is outside the vocabulary (0..{n_vocab - 1})")
            return list(v)
        if all(isinstance(t, (str, list)) for t in v):
            raise bad_request("several prompts in one request are not supported; send one request each")
    raise bad_request(f"'{name}' must be a string or a list of token ids")


def _n(body: dict) -> None:
    if get_int(body, "n", 1, lo=1, hi=N_PREDICT_MAX) != 1:
        raise bad_request("only n = 1 is supported")


# n_predict / max_tokens: -1 means "until EOS or the slot is full" (llama-server's meaning),
# below -1 is refused, above an int32 is refused (llama-server reads an int32); anything in
# between is accepted and in effect capped by the slot's context (finish reason "length").
N_PREDICT_MAX = 2**31 - 1


def _base_params(body: dict, d: Defaults, n_predict_names: Sequence[str]) -> RequestParams:
    first, *aliases = n_predict_names
    n_predict = get_int(body, first, d.n_predict, lo=-1, hi=N_PREDICT_MAX, aliases=aliases)
    sp = _sampling(body, d)
    _check_logit_bias(sp, d.n_vocab)
    return RequestParams(
        n_predict=n_predict,
        sampling=sp,
        stop=get_stop(body),
        ignore_eos=get_bool(body, "ignore_eos", False),
        min_tokens=get_int(body, "min_tokens", 0, lo=0, hi=N_PREDICT_MAX),
    )


def _check_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def parse_completion(body: Any, kind: str, d: Defaults) -> Job:
    """POST /completion (llama-server shape) or /v1/completions (OpenAI shape)."""
    body = _check_object(body)
    if kind == KIND_OAI_COMPLETION:
        _n(body)
        if get_bool(body, "echo", False):
            raise bad_request("'echo' is not supported")
        params = _base_params(body, d, ("max_tokens", "n_predict"))
    else:
        params = _base_params(body, d, ("n_predict", "max_tokens"))
    prompt = _prompt(body, d.n_vocab)
    update = None
    if kind == KIND_COMPLETION:
        sp_fields = [get_str(body, k) for k in ("system_prompt", "anti_prompt", "assistant_name")]
        if all(f is not None for f in sp_fields):
            update = SystemUpdate(*sp_fields)  # type: ignore[arg-type]
    job = Job(kind=kind, prompt=prompt, params=params, stream=get_bool(body, "stream", False),
              system_update=update)
    job.include_usage = _include_usage(body)
    return job


def _include_usage(body: dict) -> bool:
    so = body.get("stream_options")
    if so is None:
        return True
    if not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object")
    return True  # usage is always in the last chunk, as llama-server does for /v1/completions


# -- chat -------------------------------------------------------------------------------------

FALLBACK_TEMPLATE = "transcript"
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# The fallback's stops: the earliest match wins, so "\nUser:" cuts the newline before the turn.
FALLBACK_STOPS = ["\nUser:", "User:"]


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{i}].content: only parts of type 'text' are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise bad_request("Expected 'messages' to be an array")
    if not msgs:
        raise bad_request("'messages' must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role must be a string")
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    return out


def format_transcript(messages: Sequence[dict]) -> str:
    """The fallback for models without a chat template (the default Gemma 3 270M base model):
    a plain transcript in llama.cpp's parallel-example style, ending with "Assistant:"."""
    lines = [f"{FALLBACK_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


def format_chat(messages: Sequence[dict], template: str) -> str:
    """Messages to a prompt: llama_chat_apply_template with `template` (a built-in name or a
    template text llama.cpp recognises), or the transcript fallback."""
    if template == FALLBACK_TEMPLATE:
        return format_transcript(messages)
    try:
        return apply_chat_template(template, messages, add_assistant=True)
    except ValueError as e:
        raise ApiError(500, "server_error", str(e)) from None


def parse_chat(body: Any, d: Defaults, template: str) -> Job:
    """POST /v1/chat/completions."""
    body = _check_object(body)
    _n(body)
    messages = parse_messages(body)
    params = _base_params(body, d, ("max_completion_tokens", "max_tokens", "n_predict"))
    prompt = format_chat(messages, template)
    job = Job(kind=KIND_OAI_CHAT, prompt=prompt, params=params,
              stream=get_bool(body, "stream", False))
    if template == FALLBACK_TEMPLATE:
        job.extra_stops = list(FALLBACK_STOPS)
        job.strip_leading = True
    job.include_usage = _include_usage(body)
    return job


# -- tokenize / detokenize --------------------------------------------------------------------

def parse_tokenize(body: Any) -> tuple[str, bool, bool, bool]:
    """(content, add_special, parse_special, with_pieces)"""
    body = _check_object(body)
    content = get_str(body, "content")
    if content is None:
        raise bad_request("'content' is required")
    return (content, get_bool(body, "add_special", False), get_bool(body, "parse_special", True),
            get_bool(body, "with_pieces", False))


def parse_detokenize(body: Any, n_vocab: int) -> list[int]:
    body = _check_object(body)
    toks = body.get("tokens", [])
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise bad_request("'tokens' must be a list of token ids")
    for t in toks:
        if not 0 <= t < n_vocab:
            raise bad_request(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})")
    return toks


def piece_json(piece: bytes) -> str | list[int]:
    """llama-server's `with_pieces`: the text, or the bytes when they are not valid UTF-8."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


# -- responses --------------------------------------------------------------------------------

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
    return {
        "cache_n": h.n_cached_tokens,
        "prompt_n": n_prompt,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
        "prompt_per_second": n_prompt / (prompt_ms / 1000.0) if prompt_ms > 0 else 0.0,
        "predicted_n": n_pred,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / n_pred if n_pred else 0.0,
        "predicted_per_second": n_pred / (predicted_ms / 1000.0) if predicted_ms > 0 else 0.0,
    }


def usage(h) -> dict:
    n_prompt = h.n_cached_tokens + h.n_prompt_tokens
    return {
        "completion_tokens": h.n_generated,
        "prompt_tokens": n_prompt,
        "total_tokens": n_prompt + h.n_generated,
        "prompt_tokens_details": {"cached_tokens": h.n_cached_tokens},
    }


def generation_settings(p: RequestParams, n_ctx: int, stream: bool) -> dict:
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
        "logit_bias": [[t, b if math.isfinite(b) else False] for t, b in s.logit_bias.items()],
        "min_keep": 0,
        "n_probs": 0,
        "samplers": ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"],
    }


def completion_result(h, job: Job, model: str, n_ctx: int, content: str) -> dict:
    """llama-server's final /completion object (streamed last with content "")."""
    tokens_evaluated = h.n_cached_tokens + h.n_prompt_tokens
    return {
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": h.slot_id,
        "stop": True,
        "model": model,
        "tokens_predicted": h.n_generated,
        "tokens_evaluated": tokens_evaluated,
        "generation_settings": generation_settings(job.params, n_ctx, job.stream),
        "prompt": job.prompt if isinstance(job.prompt, str) else "",
        "has_new_line": "\n" in h.text,
        "truncated": False,
        "stop_type": STOP_TYPE.get(h.finish_reason, "none"),
        "stopping_word": h.stopping_word,
        "tokens_cached": tokens_evaluated + h.n_generated,
        "timings": timings(h),
    }


def completion_chunk(h, text: str, tokens: list[int], n_predicted: int) -> dict:
    return {
        "index": 0,
        "content": text,
        "tokens": tokens,
        "stop": False,
        "id_slot": h.slot_id,
        "tokens_predicted": n_predicted,
        "tokens_evaluated": h.n_cached_tokens + h.n_prompt_tokens,
    }


def _oai_head(job: Job, model: str, obj: str) -> dict:
    return {"id": job.id, "object": obj, "created": job.created, "model": model,
            "system_fingerprint": "pyllama-server"}


def oai_completion(h, job: Job, model: str, text: str) -> dict:
    out = _oai_head(job, model, "text_completion")
    out["choices"] = [{"text": text, "index": 0, "logprobs": None,
                       "finish_reason": oai_finish_reason(h.finish_reason)}]
    out["usage"] = usage(h)
    out["timings"] = timings(h)
    return out


def oai_completion_chunk(job: Job, model: str, text: str, finish_reason: str | None = None) -> dict:
    out = _oai_head(job, model, "text_completion")
    out["choices"] = [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]
    return out


def oai_chat(h, job: Job, model: str, text: str) -> dict:
    out = _oai_head(job, model, "chat.completion")
    out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": oai_finish_reason(h.finish_reason)}]
    out["usage"] = usage(h)
    out["timings"] = timings(h)
    return out


def oai_chat_chunk(job: Job, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    out = _oai_head(job, model, "chat.completion.chunk")
    out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return out
