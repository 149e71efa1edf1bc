"""Typed readers of request fields: each returns the value or the default, or raises a 400.

A field that is absent or null takes its default, as llama-server's json_value(); a field of
the wrong type or outside its range is refused with a message naming it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Protocol, Sequence

from llama_lib.sampler import Range

from .errors import bad_request
from .limits import (
    MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TEXT_BYTES, MAX_STOP, MAX_STOP_BYTES, check_count, check_strings,
    utf8_len,
)

_MISSING = object()  # "not in the body (or null)", distinct from every JSON value


class Tokenizer(Protocol):
    """What request parsing needs from the model's vocabulary (read-only, any thread)."""

    def tokenize_text(self, text: str) -> list[int]:
        """Text to token ids without BOS and without parsing special tokens."""

    def eog_tokens(self) -> Sequence[int]:
        """The end-of-generation token ids (banned by ignore_eos, as llama-server does)."""

    def tokenize_prompt_text(self, text: str, first: bool) -> list[int]:
        """A string part of a prompt mixing strings and token ids: special tokens parsed, BOS
        before the first part when the model wants one (llama-server's tokenize_mixed)."""


def check_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def check_body(body: Any) -> dict:
    """A JSON object whose strings are all valid Unicode (limits.check_strings)."""
    check_strings(check_object(body))
    return body


def first_present(body: dict, *names: str) -> Any:
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


def get_float(body: dict, name: str, default: float, allowed: Range | None = None) -> float:
    v = first_present(body, name)
    if v is _MISSING:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number")
    v = float(v)
    if allowed is not None and v not in allowed:
        raise bad_request(f"'{name}' must be {allowed.describe(str)}")
    return v


def _get_typed(body: dict, name: str, default: Any, kind: type, what: str) -> Any:
    v = first_present(body, name)
    if v is _MISSING:
        return default
    if not isinstance(v, kind):
        raise bad_request(f"'{name}' must be {what}")
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    return _get_typed(body, name, default, bool, "true or false")


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    return _get_typed(body, name, default, str, "a string")


def get_stop(body: dict) -> list[str]:
    v = first_present(body, "stop")
    if v is _MISSING:
        return []
    if isinstance(v, str):
        v = [v]
    if not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        raise bad_request("'stop' must be a string or a list of strings")
    check_count(v, MAX_STOP, "stop")
    for s in v:
        if utf8_len(s) > MAX_STOP_BYTES:
            raise bad_request(f"'stop': a stop string is longer than {MAX_STOP_BYTES} bytes")
    return [s for s in v if s]


def check_token_ids(tokens: Iterable[int], n_vocab: int, what: str) -> None:
    """Every id in the vocabulary, else a 400 "<what> <id> is outside the vocabulary (0..N-1)"."""
    for t in tokens:
        if not 0 <= t < n_vocab:
            raise bad_request(f"{what} {t} is outside the vocabulary (0..{n_vocab - 1})")


_TOKEN_ID_KEY = re.compile(r"[+-]?[0-9]+")


def get_logit_bias(body: dict, tok: Tokenizer | None = None) -> dict[int, float]:
    """OpenAI's {"token id" | "text": bias} or llama-server's [[token id | "text", bias | false], ...].

    A text is tokenized (no BOS, no special tokens) and each of its tokens gets the bias, as
    llama-server does; in the object form a key that is all digits is a token id. Biases for
    the same token add up (the sampler applies every entry)."""
    v = first_present(body, "logit_bias")
    if v is _MISSING:
        return {}
    if isinstance(v, (dict, list)):
        check_count(v, MAX_LOGIT_BIAS, "logit_bias")
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
            if utf8_len(key) > MAX_LOGIT_BIAS_TEXT_BYTES:
                raise bad_request(f"'logit_bias': a text key is longer than {MAX_LOGIT_BIAS_TEXT_BYTES} bytes")
            toks = tok.tokenize_text(key)
        elif isinstance(key, bool) or not isinstance(key, int):
            raise bad_request("'logit_bias' keys must be token ids (integers) or texts")
        else:
            toks = [key]
        for t in toks:
            out[t] = out.get(t, 0.0) + float(bias)
    return out
