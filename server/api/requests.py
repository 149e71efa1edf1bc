"""Request bodies to jobs: every generation, tokenize and detokenize body is parsed here.

`parse_completion` (/completion, /v1/completions) and `parse_chat` (/v1/chat/completions)
return a `Job` (the engine's RequestParams plus how to answer) or raise `ApiError`; nothing
here touches a socket or the model (the vocabulary comes in as a `Tokenizer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from llama_lib import RequestParams, SamplingParams
from llama_lib.engine.spec_params import RequestSpec
from llama_lib.sampler import SAMPLING_RANGES, Range

from ..chat.control import register as register_control
from ..chat.options import completion_reasoning, reasoning_params
from ..chat.render import render_chat
from ..errors import bad_request
from ..fields import (
    Tokenizer, check_body, check_object, check_token_ids, get_bool, get_float, get_int, get_logit_bias,
    get_stop, get_str,
)
from ..limits import MAX_USER_LEN, N_PROBS_MAX
from .grammar_limits import check_grammar
from .job import KIND_OAI_CHAT, Defaults, Job, SystemUpdate
from .samplers import chain_fields
from .shapes import shape_for
from .shapes.common import new_id
from .structured import get_grammar

# llama-server's sampling fields (server-schema.cpp) that set the SamplingParams field of the
# same name, with their JSON type; their ranges are llama_lib's SAMPLING_RANGES
SAMPLING_FIELDS: tuple[tuple[str, type], ...] = (
    ("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float),
    ("typical_p", float), ("repeat_penalty", float), ("repeat_last_n", int),
    ("frequency_penalty", float), ("presence_penalty", float),
)


def _sampling_field(body: dict, name: str, kind: type, default: float) -> float:
    allowed = SAMPLING_RANGES[name]
    if kind is int:
        return get_int(body, name, default, lo=allowed.lo, hi=allowed.hi)
    return get_float(body, name, default, allowed)


def sampling_params(body: dict, d: Defaults, tok: Tokenizer | None = None) -> SamplingParams:
    ds, seeds = d.sampling, SAMPLING_RANGES["seed"]
    seed = get_int(body, "seed", -1 if ds.seed is None else ds.seed, lo=seeds.lo, hi=seeds.hi)
    values = {name: _sampling_field(body, name, kind, getattr(ds, name)) for name, kind in SAMPLING_FIELDS}
    return SamplingParams(
        **values,
        **chain_fields(body, ds),
        seed=None if seed == -1 else seed,
        logit_bias=get_logit_bias(body, tok),
        grammar=_or_default(get_grammar(body), ds.grammar),
    )


def _or_default(value, default):
    return default if value is None else value


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
        check_token_ids(v, n_vocab, f"'{name}' token id")
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
# sse_ping_interval has the same bounds.
N_PREDICT_MAX = 2**31 - 1


def base_params(body: dict, d: Defaults, n_predict_names: Sequence[str],
                 tok: Tokenizer | None = None) -> RequestParams:
    first, *aliases = n_predict_names
    n_predict = get_int(body, first, d.n_predict, lo=-1, hi=N_PREDICT_MAX, aliases=aliases)
    sp = sampling_params(body, d, tok)
    check_token_ids(sp.logit_bias, d.n_vocab, "'logit_bias' token")
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
        post_sampling_probs=get_bool(body, "post_sampling_probs", False),
        # prompt progress events: streams only, as llama-server
        return_progress=get_bool(body, "return_progress", False) and get_bool(body, "stream", False),
        user=get_user(body.get("user"), "'user'"),
        priority=get_int(body, "priority", 0, lo=d.priority_min, hi=_I32),
        **control_fields(body, d),
    )


def get_user(v: Any, what: str) -> str | None:
    """A user name (docs/scheduling.md): a string of 1 to MAX_USER_LEN printable characters;
    absent or null: None. 400 otherwise."""
    if v is None:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= MAX_USER_LEN or not v.isprintable():
        raise bad_request(f"{what} must be a string of 1 to {MAX_USER_LEN} printable characters")
    return v


# an int32, as llama-server reads these fields
_I32 = 2**31 - 1


def control_fields(body: dict, d: Defaults) -> dict[str, int]:
    """llama-server's engine-side controls: context shift (n_keep, n_discard), n_indent,
    t_max_predict_ms and n_cache_reuse. t_max_prompt_ms is accepted and ignored, as llama-server
    v0.5.0 does (its schema leaves it out: "TODO: implement")."""
    get_int(body, "t_max_prompt_ms", -1, lo=-_I32 - 1, hi=_I32)  # checked only
    return {
        "n_keep": get_int(body, "n_keep", d.n_keep, lo=-1, hi=_I32),
        "n_discard": get_int(body, "n_discard", 0, lo=0, hi=_I32),
        "n_indent": get_int(body, "n_indent", 0, lo=0, hi=_I32),
        "t_max_predict_ms": get_int(body, "t_max_predict_ms", -1, lo=-_I32 - 1, hi=_I32),
        "n_cache_reuse": get_int(body, "n_cache_reuse", d.n_cache_reuse, lo=0, hi=_I32),
        "speculative": spec_fields(body),
    }


def spec_fields(body: dict) -> RequestSpec | None:
    """The request's own draft limits, under llama-server's names ("speculative.n_max",
    "speculative.n_min", "speculative.p_min"); None when it gives none."""
    if not any(k.startswith("speculative.") for k in body):
        return None
    return RequestSpec(n_max=get_int(body, "speculative.n_max", None, lo=0, hi=_I32),
                       n_min=get_int(body, "speculative.n_min", None, lo=0, hi=_I32),
                       p_min=get_float(body, "speculative.p_min", None, Range(0.0, 1.0)))


@dataclass
class ServerInfo:
    """What request parsing needs from the running server beyond `Defaults`."""

    tok: Tokenizer | None = None  # logit_bias texts, ignore_eos's EOG tokens
    mark: Callable[[str], str] | None = None  # wraps special-token texts in users' strings (chat)
    verbose: bool = False         # llama-server's --verbose: "__verbose" in every answer
    responses: Any = None         # the ResponseStore (previous_response_id, store)
    n_slots: int = 1              # n (n_cmpl) and id_slot are bounded by the slots


def parse_completion(body: Any, kind: str, d: Defaults, info: ServerInfo | None = None) -> Job:
    """POST /completion (llama-server shape) or /v1/completions (OpenAI shape)."""
    info = info or ServerInfo()
    body = check_body(body)
    shape = shape_for(kind)
    if shape.refuses_echo and get_bool(body, "echo", False):
        raise bad_request("'echo' is not supported")
    _refuse_parsers(body)
    params = base_params(body, d, shape.n_predict_names, info.tok)
    prompts = _prompts(body, d.n_vocab, tok=info.tok)
    update = None
    if shape.takes_system_update:
        sp_fields = [get_str(body, k) for k in ("system_prompt", "anti_prompt", "assistant_name")]
        if all(f is not None for f in sp_fields):
            update = SystemUpdate(*sp_fields)  # type: ignore[arg-type]
    stream = get_bool(body, "stream", False)
    common, slot = _common_fields(body, d, info)
    # llama-server reads "logprobs" (OpenAI's /v1/completions field: the top-n count) as an
    # alias of n_probs, on both endpoints
    n_probs = _n_probs(get_int(body, "n_probs", 0, lo=0, hi=N_PROBS_MAX, aliases=("logprobs",)), d)
    reasoning = completion_reasoning(body)  # the budget's low-level fields, as llama-server reads them
    if reasoning is not None:
        params = replace(params, sampling=replace(params.sampling, reasoning=reasoning))
    return Job(kind=kind, prompt=prompts[0], params=replace(params, slot=slot, n_probs=n_probs),
               stream=stream, system_update=update, prompts=tuple(prompts), **common)


def _refuse_parsers(body: dict) -> None:
    """llama-server's output parsers on a prompt route (its chat routes set them for
    themselves): a completion asked to parse tool calls, or given a serialized parser, would
    answer in another shape than asked, so they are refused rather than dropped."""
    if get_bool(body, "parse_tool_calls", False):
        raise bad_request("'parse_tool_calls' is not supported on this endpoint: "
                          "send the tools to /v1/chat/completions")
    if body.get("chat_parser") is not None:
        raise bad_request("'chat_parser' (llama-server's serialized parser) is not supported")


def _n_probs(n: int, d: Defaults) -> int:
    """n_probs as the engine takes it: at most the whole vocabulary. The request's value is
    at most N_PROBS_MAX (llama-server has no bound: each candidate is a JSON object per
    generated token, and 1,000,000 grew its memory by half a gigabyte for a few tokens)."""
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
    return _n_probs(get_int(body, "n_probs", 0, lo=0, hi=N_PROBS_MAX), d)


def _common_fields(body: dict, d: Defaults, info: ServerInfo) -> tuple[dict[str, Any], int | None]:
    """The fields every generation endpoint reads (llama-server's schema): the Job's, and the
    slot (id_slot) for its RequestParams."""
    fields: dict[str, Any] = {"n_cmpl": _n(body, info.n_slots)}
    slot = _id_slot(body, info.n_slots)
    fields["include_usage"] = _include_usage(body)
    fields["verbose"] = get_bool(body, "verbose", info.verbose)
    fields["return_tokens"] = get_bool(body, "return_tokens", False)
    fields["timings_per_token"] = get_bool(body, "timings_per_token", False)
    fields["sse_ping_interval"] = get_int(body, "sse_ping_interval", d.sse_ping_interval, lo=-1, hi=N_PREDICT_MAX)
    rf = body.get("response_fields")
    if rf is not None:
        if not isinstance(rf, list) or not all(isinstance(f, str) for f in rf):
            raise bad_request("'response_fields' must be a list of strings")
        fields["response_fields"] = tuple(rf)
    return fields, slot


def _include_usage(body: dict) -> bool:
    """stream_options.include_usage (default false, as llama-server): only OpenAI chat streams
    use it; /v1/completions streams always end with usage, non-streamed answers always carry it."""
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object")
    return get_bool(so, "include_usage", False)


def parse_chat(body: Any, d: Defaults, template, info: ServerInfo | None = None,
               kind: str = KIND_OAI_CHAT) -> Job:
    """POST /v1/chat/completions, and the formats read as a chat (`kind`'s shape converts
    their body first: `Shape.chat_body`)."""
    info = info or ServerInfo()
    body, wire = shape_for(kind).chat_body(body, info)
    body = check_object(body)
    chat = render_chat(body, template, d.reasoning_format, info.mark, d.chat)
    params = base_params(body, d, shape_for(kind).n_predict_names, info.tok)
    stream = get_bool(body, "stream", False)
    plan = chat.plan
    if plan.grammar:
        if get_grammar(body) is not None:
            raise bad_request("Cannot use custom grammar constraints with tools.")
        check_grammar(plan.grammar, "tools")
        params = replace(params, sampling=replace(params.sampling, grammar=plan.grammar,
                                                  grammar_lazy=plan.lazy, grammar_triggers=plan.triggers))
    transcript: dict[str, Any] = {}
    if template.stops:  # the transcript's turn markers
        # drop the space the model writes after "Assistant:", but not inside a continued prefill
        transcript = {"extra_stops": tuple(template.stops), "strip_leading": not chat.prefill}
    common, slot = _common_fields(body, d, info)
    params = replace(params, slot=slot, n_probs=_chat_n_probs(body, d))
    reasoning = reasoning_params(body, d.chat, plan.markers, plan.opened)
    if reasoning is not None:  # a thinking template: the budget, and an id the control endpoint finds
        params = replace(params, sampling=replace(params.sampling, reasoning=reasoning))
        common["id"] = new_id(shape_for(kind).id_prefix)
        register_control(common["id"], reasoning.switch)
    return Job(kind=kind, prompt=chat.text, params=params, stream=stream,
               chat=plan if plan.active else None, wire=wire, **transcript, **common)



def parse_job(body: Any, kind: str, d: Defaults, template, info: ServerInfo | None = None) -> Job:
    """A generation body of any format: a chat body (messages) or a prompt body, as the
    kind's shape reads them."""
    if shape_for(kind).reads_messages:
        return parse_chat(body, d, template, info, kind)
    return parse_completion(body, kind, d, info)


# -- tokenize / detokenize --------------------------------------------------------------------

def parse_tokenize(body: Any) -> tuple[str, bool, bool, bool]:
    """(content, add_special, parse_special, with_pieces)"""
    body = check_body(body)
    content = get_str(body, "content")
    if content is None:
        raise bad_request("'content' is required")
    return (content, get_bool(body, "add_special", False), get_bool(body, "parse_special", True),
            get_bool(body, "with_pieces", False))


def parse_detokenize(body: Any, n_vocab: int) -> list[int]:
    body = check_body(body)
    toks = body.get("tokens", [])
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise bad_request("'tokens' must be a list of token ids")
    check_token_ids(toks, n_vocab, "token id")
    return toks
