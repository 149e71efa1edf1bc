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
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from llama_lib import FinishReason, RequestParams, SamplingParams, apply_chat_template

from . import __version__
from .structured import get_grammar

# OpenAI's `system_fingerprint`: llama-server sends its build, "b<build number>-<commit>", and
# clients (the upstream tests, some SDK users) check that it starts with "b".
SYSTEM_FINGERPRINT = f"b0-pyllama-{__version__}"


class Tokenizer(Protocol):
    """What request parsing needs from the model's vocabulary (read-only, any thread)."""

    def tokenize_text(self, text: str) -> list[int]:
        """Text to token ids without BOS and without parsing special tokens."""

    def eog_tokens(self) -> Sequence[int]:
        """The end-of-generation token ids (banned by ignore_eos, as llama-server does)."""

    def tokenize_prompt_text(self, text: str, first: bool) -> list[int]:
        """A string part of a prompt mixing strings and token ids: special tokens parsed, BOS
        before the first part when the model wants one (llama-server's tokenize_mixed)."""

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


_TOKEN_ID_KEY = re.compile(r"[+-]?[0-9]+")


def get_logit_bias(body: dict, tok: Tokenizer | None = None) -> dict[int, float]:
    """OpenAI's {"token id" | "text": bias} or llama-server's [[token id | "text", bias | false], ...].

    A text is tokenized (no BOS, no special tokens) and each of its tokens gets the bias, as
    llama-server does; in the object form a key that is all digits is a token id. Biases for
    the same token add up (the sampler applies every entry)."""
    v = _get(body, "logit_bias")
    if v is _MISSING:
        return {}
    pairs: list[tuple[Any, Any]]
    if isinstance(v, dict):
        pairs = []
        for k, b in v.items():
            pairs.append((int(k), b) if _TOKEN_ID_KEY.fullmatch(k) else (k, b))
    elif isinstance(v, list):
        pairs = []
        for p in v:
            if not (isinstance(p, list) and len(p) == 2):
                raise bad_request("'logit_bias' as a list must hold [token id or text, bias] pairs")
            pairs.append((p[0], p[1]))
    else:
        raise bad_request("'logit_bias' must be an object {token id or text: bias} or a list of pairs")
    out: dict[int, float] = {}
    for key, bias in pairs:
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise bad_request("'logit_bias' values must be finite numbers (or false to ban a token)")
        if isinstance(key, str):
            if tok is None:
                raise bad_request(f"'logit_bias' key {key[:20]!r} is not a token id")
            toks = tok.tokenize_text(key)
        elif isinstance(key, bool) or not isinstance(key, int):
            raise bad_request("'logit_bias' keys must be token ids (integers) or texts")
        else:
            toks = [key]
        for t in toks:
            out[t] = out.get(t, 0.0) + float(bias)
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
    # llama-server's sampling flags (--top-k ...), llama.cpp's defaults
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    cache_prompt: bool = True  # the default of a request's cache_prompt (--no-cache-prompt)
    grammar: str | None = None  # GBNF of --grammar / --json-schema, for requests with none


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
    include_usage: bool = False  # stream_options.include_usage: a chat stream ends with a usage chunk
    verbose: bool = False        # OpenAI shapes carry "__verbose" (the /completion object)
    return_tokens: bool = False  # /completion: the generated ids in "tokens"
    response_fields: list[str] = field(default_factory=list)  # /completion: keep only these ("a/b" nested)
    prompts: list[str | list[int]] = field(default_factory=list)  # several prompts: one result each
    n_cmpl: int = 1              # n: completions per prompt (one slot each, seeds seed, seed+1, ...)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""


def _sampling(body: dict, d: Defaults, tok: Tokenizer | None = None) -> SamplingParams:
    seed = get_int(body, "seed", d.seed, lo=-1, hi=2**32 - 1)
    return SamplingParams(
        temperature=get_float(body, "temperature", d.temperature, 0.0, 100.0),
        top_k=get_int(body, "top_k", d.top_k, lo=0, hi=1 << 30),
        top_p=get_float(body, "top_p", d.top_p, 0.0, 1.0),
        min_p=get_float(body, "min_p", d.min_p, 0.0, 1.0),
        typical_p=get_float(body, "typical_p", d.typical_p, 0.0, 1.0),
        repeat_penalty=get_float(body, "repeat_penalty", d.repeat_penalty, 1e-6, 10.0),
        repeat_last_n=get_int(body, "repeat_last_n", d.repeat_last_n, lo=-1, hi=1 << 20),
        frequency_penalty=get_float(body, "frequency_penalty", d.frequency_penalty, -2.0, 2.0),
        presence_penalty=get_float(body, "presence_penalty", d.presence_penalty, -2.0, 2.0),
        seed=None if seed == -1 else seed,
        logit_bias=get_logit_bias(body, tok),
        grammar=_or_default(get_grammar(body), d.grammar),
    )


def _or_default(value, default):
    return default if value is None else value


def _check_logit_bias(sp: SamplingParams, n_vocab: int) -> None:
    for tok in sp.logit_bias:
        if not 0 <= tok < n_vocab:
            raise bad_request(f"'logit_bias' token {tok} is outside the vocabulary (0..{n_vocab - 1})")


def _one_prompt(v: Any, n_vocab: int, name: str, tok: Tokenizer | None = None) -> str | list[int]:
    """One prompt: a string, a list of token ids, a list mixing strings and token ids
    (tokenized here), or llama-server's {"prompt_string": ...} object. Never empty:
    llama-server would generate from BOS alone; we refuse (400)."""
    if isinstance(v, dict):
        if v.get("multimodal_data"):
            raise bad_request(f"'{name}': multimodal data is not supported by this server")
        s = v.get("prompt_string")
        if not isinstance(s, str):
            raise bad_request(f"'{name}'.prompt_string must be a string")
        v = s
    if (isinstance(v, list) and tok is not None and any(isinstance(t, str) for t in v)
            and all(isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool)) for t in v)):
        mixed: list[int] = []
        for i, t in enumerate(v):
            mixed.extend(tok.tokenize_prompt_text(t, i == 0) if isinstance(t, str) else [t])
        v = mixed
    if isinstance(v, str):
        if not v:
            raise bad_request(f"'{name}' is empty")
        return v
    if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        if not v:
            raise bad_request(f"'{name}' is empty")
        for t in v:
            if not 0 <= t < n_vocab:
                raise bad_request(f"'{name}' token id {t} is outside the vocabulary (0..{n_vocab - 1})")
        return list(v)
    if isinstance(v, list) and any(isinstance(t, str) for t in v):
        raise bad_request(f"'{name}': strings mixed with token ids in one prompt are not supported")
    raise bad_request(f"'{name}' must be a string, a list of token ids, or a list of those")


def _prompts(body: dict, n_vocab: int, name: str = "prompt",
             tok: Tokenizer | None = None) -> list[str | list[int]]:
    """llama-server's prompt forms: one prompt (see `_one_prompt`), or a list of them (one
    result each). A list holding any token id is one prompt, as llama-server reads it."""
    v = body.get(name, None)
    if v is None:
        raise bad_request(f"'{name}' is required")
    if (isinstance(v, list) and v and all(isinstance(p, (str, list, dict)) for p in v)
            and not any(isinstance(p, int) for p in v)):
        return [_one_prompt(p, n_vocab, f"{name}[{i}]", tok) for i, p in enumerate(v)]
    return [_one_prompt(v, n_vocab, name, tok)]


def _n(body: dict, n_max: int) -> int:
    """llama-server's n_cmpl (alias OpenAI's n): completions per prompt, at most the slots."""
    return get_int(body, "n_cmpl", 1, lo=1, hi=max(1, n_max), aliases=("n",))


def _id_slot(body: dict, n_slots: int) -> int | None:
    """id_slot: run in this slot (waiting for it); -1 (the default): any free one."""
    v = get_int(body, "id_slot", -1, lo=-1, hi=max(0, n_slots - 1))
    return None if v < 0 else v


# n_predict / max_tokens: -1 means "until EOS or the slot is full" (llama-server's meaning),
# below -1 is refused, above an int32 is refused (llama-server reads an int32); anything in
# between is accepted and in effect capped by the slot's context (finish reason "length").
N_PREDICT_MAX = 2**31 - 1


def _base_params(body: dict, d: Defaults, n_predict_names: Sequence[str],
                 tok: Tokenizer | None = None) -> RequestParams:
    first, *aliases = n_predict_names
    n_predict = get_int(body, first, d.n_predict, lo=-1, hi=N_PREDICT_MAX, aliases=aliases)
    sp = _sampling(body, d, tok)
    _check_logit_bias(sp, d.n_vocab)
    ignore_eos = get_bool(body, "ignore_eos", d.ignore_eos)
    if ignore_eos and tok is not None:
        # llama-server bans the end-of-generation tokens (-inf, shown as null) rather than
        # sampling through them, and lists them in generation_settings.logit_bias
        for t in tok.eog_tokens():
            sp.logit_bias[t] = -math.inf
    return RequestParams(
        n_predict=n_predict,
        sampling=sp,
        stop=get_stop(body),
        ignore_eos=ignore_eos,
        min_tokens=get_int(body, "min_tokens", 0, lo=0, hi=N_PREDICT_MAX),
        cache_prompt=get_bool(body, "cache_prompt", d.cache_prompt),
    )


def _check_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


@dataclass
class ServerInfo:
    """What request parsing needs from the running server beyond `Defaults`."""

    tok: Tokenizer | None = None  # logit_bias texts, ignore_eos's EOG tokens
    verbose: bool = False         # llama-server's --verbose: "__verbose" in every answer
    n_slots: int = 1              # n (n_cmpl) and id_slot are bounded by the slots


def parse_completion(body: Any, kind: str, d: Defaults, info: ServerInfo | None = None) -> Job:
    """POST /completion (llama-server shape) or /v1/completions (OpenAI shape)."""
    info = info or ServerInfo()
    body = _check_object(body)
    if kind == KIND_OAI_COMPLETION:
        if get_bool(body, "echo", False):
            raise bad_request("'echo' is not supported")
        params = _base_params(body, d, ("max_tokens", "n_predict"), info.tok)
    else:
        params = _base_params(body, d, ("n_predict", "max_tokens"), info.tok)
    prompts = _prompts(body, d.n_vocab, tok=info.tok)
    update = None
    if kind == KIND_COMPLETION:
        sp_fields = [get_str(body, k) for k in ("system_prompt", "anti_prompt", "assistant_name")]
        if all(f is not None for f in sp_fields):
            update = SystemUpdate(*sp_fields)  # type: ignore[arg-type]
    job = Job(kind=kind, prompt=prompts[0], params=params, stream=get_bool(body, "stream", False),
              system_update=update, prompts=prompts)
    _common_fields(job, body, info)
    # llama-server reads "logprobs" (OpenAI's /v1/completions field: the top-n count) as an
    # alias of n_probs, on both endpoints
    params.n_probs = _n_probs(get_int(body, "n_probs", 0, lo=0, hi=N_PREDICT_MAX,
                                      aliases=("logprobs",)), d)
    return job


def _n_probs(n: int, d: Defaults) -> int:
    """n_probs as the engine takes it: at most the whole vocabulary."""
    return min(n, d.n_vocab)


# OpenAI's bound of chat's top_logprobs
TOP_LOGPROBS_MAX = 20


def _chat_n_probs(body: dict, d: Defaults) -> int:
    """Chat's logprobs (bool) + top_logprobs as llama-server maps them onto n_probs:
    logprobs true gives top_logprobs (default 20) candidates; top_logprobs alone is refused."""
    top = get_int(body, "top_logprobs", TOP_LOGPROBS_MAX, lo=0, hi=TOP_LOGPROBS_MAX)
    if get_bool(body, "logprobs", False):
        return _n_probs(top, d)
    if body.get("top_logprobs") is not None:
        raise bad_request("top_logprobs requires logprobs to be set to true")
    return _n_probs(get_int(body, "n_probs", 0, lo=0, hi=N_PREDICT_MAX), d)


def _common_fields(job: Job, body: dict, info: ServerInfo) -> None:
    """The fields every generation endpoint reads (llama-server's schema)."""
    job.n_cmpl = _n(body, info.n_slots)
    job.params.slot = _id_slot(body, info.n_slots)
    job.include_usage = _include_usage(body)
    job.verbose = get_bool(body, "verbose", info.verbose)
    job.return_tokens = get_bool(body, "return_tokens", False)
    rf = body.get("response_fields")
    if rf is not None:
        if not isinstance(rf, list) or not all(isinstance(f, str) for f in rf):
            raise bad_request("'response_fields' must be a list of strings")
        job.response_fields = list(rf)


def _include_usage(body: dict) -> bool:
    """stream_options.include_usage (default false, as llama-server): only OpenAI chat streams
    use it; /v1/completions streams always end with usage, non-streamed answers always carry it."""
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object")
    return get_bool(so, "include_usage", False)


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
        return "\n".join(parts)  # llama-server joins text parts with a newline
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


def format_transcript(messages: Sequence[dict], add_assistant: bool = True) -> str:
    """The fallback for models without a chat template (the default Gemma 3 270M base model):
    a plain transcript in llama.cpp's parallel-example style, ending with "Assistant:"."""
    lines = [f"{FALLBACK_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    if add_assistant:
        lines.append("Assistant:")
    return "\n".join(lines)


def format_chat(messages: Sequence[dict], template: str, add_assistant: bool = True) -> str:
    """Messages to a prompt: llama_chat_apply_template with `template` (a built-in name or a
    template text llama.cpp recognises), or the transcript fallback."""
    if template == FALLBACK_TEMPLATE:
        return format_transcript(messages, add_assistant)
    try:
        return apply_chat_template(template, messages, add_assistant=add_assistant)
    except ValueError as e:
        raise ApiError(500, "server_error", str(e)) from None


@dataclass
class ChatPrompt:
    text: str
    prefill: str | None  # the final assistant message being continued, else None


def render_chat(body: Any, template: str) -> ChatPrompt:
    """messages + add_generation_prompt / continue_final_message to a prompt, as llama-server:
    a final assistant message is a prefill the model continues (no generation prompt after
    it); two assistant messages at the end, or both options true, are refused (400)."""
    body = _check_object(body)
    messages = parse_messages(body)
    add_gen = get_bool(body, "add_generation_prompt", True)
    cfm = body.get("continue_final_message")
    # llama-server: true, "content" or "reasoning_content" continue; anything else does not
    cont = cfm is True or cfm in ("content", "reasoning_content")
    if not cont and messages[-1]["role"] == "assistant":
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise bad_request("Cannot have 2 or more assistant messages at the end of the list.")
        cont, add_gen = True, False
    if cont and add_gen:
        raise bad_request("Cannot set both add_generation_prompt and continue_final_message to true.")
    if cont and messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        head = format_chat(messages[:-1], template, add_assistant=True)
        if template == FALLBACK_TEMPLATE and prefill:
            head += " "  # "Assistant: <prefill>", as the transcript writes every turn
        return ChatPrompt(head + prefill, prefill)
    return ChatPrompt(format_chat(messages, template, add_assistant=add_gen), None)


def parse_chat(body: Any, d: Defaults, template: str, info: ServerInfo | None = None) -> Job:
    """POST /v1/chat/completions."""
    info = info or ServerInfo()
    body = _check_object(body)
    chat = render_chat(body, template)
    params = _base_params(body, d, ("max_completion_tokens", "max_tokens", "n_predict"), info.tok)
    job = Job(kind=KIND_OAI_CHAT, prompt=chat.text, params=params,
              stream=get_bool(body, "stream", False))
    if template == FALLBACK_TEMPLATE:
        job.extra_stops = list(FALLBACK_STOPS)
        # drop the space the model writes after "Assistant:", but not inside a continued prefill
        job.strip_leading = not chat.prefill
    _common_fields(job, body, info)
    params.n_probs = _chat_n_probs(body, d)
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
    grammar = getattr(s, "grammar", None)
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
        "grammar": grammar if isinstance(grammar, str) else "",
        "grammar_lazy": False,
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


def oai_completion(h, job: Job, model: str, text: str, verbose: dict | None = None,
                   index: int = 0) -> dict:
    """`verbose`: the /completion object, sent as "__verbose" when the job asked for it."""
    out = _oai_head(job, model, "text_completion")
    out["choices"] = [{"text": text, "index": index, "logprobs": None,
                       "finish_reason": oai_finish_reason(h.finish_reason)}]
    out["usage"] = usage(h)
    if verbose is not None:
        out["__verbose"] = verbose
    out["timings"] = timings(h)
    return out


def oai_completion_chunk(job: Job, model: str, text: str, finish_reason: str | None = None,
                         index: int = 0) -> dict:
    out = _oai_head(job, model, "text_completion")
    out["choices"] = [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]
    return out


def oai_chat(h, job: Job, model: str, text: str, verbose: dict | None = None,
             index: int = 0) -> dict:
    out = _oai_head(job, model, "chat.completion")
    out["choices"] = [{"index": index, "message": {"role": "assistant", "content": text},
                       "logprobs": None, "finish_reason": oai_finish_reason(h.finish_reason)}]
    out["usage"] = usage(h)
    if verbose is not None:
        out["__verbose"] = verbose
    out["timings"] = timings(h)
    return out


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
