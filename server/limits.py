"""Bounds on what a request may hold, checked before any template renders or libllama sees it.

The body itself is at most 8 MiB (the transport's bound); inside it a few fields cost far more
than their bytes: every message is rendered and tokenized, every `n_probs` candidate becomes a
JSON object per generated token, a JSON Schema is converted recursively. llama-server bounds none
of these. The bounds (docs/server.md, "Request limits"), each a 400 naming it:
"""

from __future__ import annotations

import re
from typing import Any

from .errors import bad_request

MAX_MESSAGES = 4_096             # chat messages in one request
MAX_MESSAGES_BYTES = 4 << 20     # their text in all (UTF-8); the body is at most 8 MiB
MAX_TOOLS = 128                  # tools in one chat request (OpenAI's bound)
MAX_TOOLS_BYTES = 1 << 20        # their JSON in all
MAX_STOP = 64                    # stop strings
MAX_STOP_BYTES = 1_024           # each stop string (UTF-8)
MAX_LOGIT_BIAS = 4_096           # logit_bias entries
MAX_LOGIT_BIAS_TEXT_BYTES = 1_024  # a logit_bias text key (it is tokenized)
N_PROBS_MAX = 100                # n_probs / logprobs: candidates per generated token
MAX_USER_LEN = 256               # a user name: the `user` field or the --user-header header
SCHEMA_MAX_DEPTH = 128           # JSON nesting of a JSON Schema (the converter recurses per level)
SCHEMA_MAX_NODES = 100_000       # values (objects, arrays, strings, ...) in a JSON Schema

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_strings(body: Any) -> None:
    """Every string of a parsed JSON body (keys too) must be valid Unicode. A JSON text may
    escape a lone UTF-16 surrogate ("\\ud83d"), which Python decodes but no UTF-8 encoder
    takes: refused here (400) instead of failing later (a 500). NUL characters are kept, as
    llama-server keeps them. Iterative: the body's depth does not matter."""
    todo = [body]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise bad_request(f"a string holds a lone UTF-16 surrogate "
                                  f"(\\u{ord(_SURROGATE.search(v).group()):04x}), which is not valid Unicode")
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)


def utf8_len(s: str) -> int:
    """Bytes of `s` in UTF-8 (after check_strings: no surrogates), without encoding it."""
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def check_count(values: Any, limit: int, field: str) -> None:
    if len(values) > limit:
        raise bad_request(f"'{field}' holds {len(values)} entries; the limit is {limit}")


def json_shape(value: Any, max_depth: int, max_nodes: int) -> tuple[int, int, int]:
    """(depth, nodes, string bytes) of a JSON value, iteratively, stopping once past a bound."""
    depth = nodes = n_bytes = 0
    todo = [(value, 1)]
    while todo and depth <= max_depth and nodes <= max_nodes:
        v, d = todo.pop()
        nodes += 1
        depth = max(depth, d)
        if isinstance(v, str):
            n_bytes += utf8_len(v)
        elif isinstance(v, dict):
            n_bytes += sum(utf8_len(k) for k in v)
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
    return depth, nodes, n_bytes


def check_schema(schema: Any, field: str) -> None:
    """A JSON Schema's depth and size, before the converter recurses into it (400 naming the
    bound)."""
    depth, nodes, _ = json_shape(schema, SCHEMA_MAX_DEPTH, SCHEMA_MAX_NODES)
    if depth > SCHEMA_MAX_DEPTH:
        raise bad_request(f"'{field}': the JSON schema is nested too deeply (more than {SCHEMA_MAX_DEPTH} levels)")
    if nodes > SCHEMA_MAX_NODES:
        raise bad_request(f"'{field}': the JSON schema holds more than {SCHEMA_MAX_NODES} values")
