"""Issue 30, the bombs that reach libllama: bounded inputs, through the real server on the real model.

Each test fails on the code before the limits (checked by running it there):
- the 50,000-deep grammar killed the process (SIGSEGV in llama-grammar.cpp's parser: the
  connection drops and /health no longer answers);
- 20,000 alternatives (a grammar, or a JSON Schema enum) were accepted and took minutes for
  two tokens (the 30 s client timeout fails);
- a deep `parameters` schema with tool_choice "auto" fell back to "any object" and rendered the
  whole schema into the prompt (200, tens of seconds);
- `n_probs: 1000000` was a 200 that grew the server by ~800 MB for 8 tokens;
- 100,000 messages were rendered and tokenized before the context refused them (150 s);
- 129 tools, a 2 KB stop string, 5,000 logit_bias entries, a 5 MiB message were accepted
  (65 stop strings were already refused: kept as a check of the same bound);
- `/tokenize` of "x\\u0000\\ud83d" (a lone surrogate) was a 500 (UnicodeEncodeError).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import requests

from server_util import ROOT, ServerProcess, proc_rss_kb

sys.path.insert(0, str(ROOT))
from server.api.grammar_limits import measure  # noqa: E402

THREADS = os.environ.get("TEST_THREADS", "2")
LLAMA_GRAMMARS = ROOT / ".llama" / "src" / "llama.cpp" / "grammars"
HI = [{"role": "user", "content": "hi"}]
QUICK = 30  # seconds: what a refused request may take at most, even on a loaded machine


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")
    p = ServerProcess(["-np", "2", "-c", "4096", "-t", THREADS, "-tb", THREADS, "--embedding"],
                      base / "srv.log")
    try:
        p.wait_ready(timeout=180)
        yield p
    finally:
        p.stop()


def refused(r: requests.Response, *words: str) -> str:
    """A 400 in llama-server's error shape whose message names every one of `words`."""
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400
    for w in words:
        assert w in err["message"], err["message"]
    return err["message"]


def still_serving(srv: ServerProcess) -> None:
    assert srv.proc.poll() is None, srv.log_tail()
    r = srv.post("/completion", {"prompt": "Hello", "n_predict": 2}, timeout=120)
    assert r.status_code == 200, r.text


def schema_items(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": "array", "items": s}
    return s


# -- grammars --------------------------------------------------------------------------------

def test_scan_skips_literals_classes_and_comments():
    """Parentheses and bars inside "...", [...] (escapes included) and comments are text."""
    g = 'root ::= "((|\\"((" [(|\\]] # ((((|\n  ("a" | ("b" | "c" | "d")))? x{2,5}\nx ::= "y"'
    s = measure(g)
    assert (s.depth, s.alternatives, s.total_alternatives) == (2, 3, 3)
    assert s.rules == 2 + 2 + 1 + 3  # two definitions, two groups, one ?, x{2,5}: 3 optional copies
    assert s.expansion == (1 + 2) * 5
    assert measure('root ::= "' + "(" * 1000).depth == 0  # an unclosed literal swallows the rest


def test_deep_grammar_refused_and_server_lives(srv):
    grammar = "root ::= " + "(" * 50_000 + '"a"' + ")" * 50_000
    r = srv.post("/completion", {"prompt": "hi", "n_predict": 2, "grammar": grammar}, timeout=QUICK)
    refused(r, "nested groups", "200")
    still_serving(srv)


def test_many_alternatives_refused(srv):
    grammar = "root ::= " + " | ".join(f'"a{i}"' for i in range(20_000))
    t0 = time.perf_counter()
    r = srv.post("/completion", {"prompt": "hi", "n_predict": 2, "grammar": grammar}, timeout=QUICK)
    refused(r, "alternatives", "1024")
    assert time.perf_counter() - t0 < 5


def test_repetition_bomb_refused(srv):
    """`{m,n}` copies its item: 1,000 literals of 1 KB repeated 2,000 times would be 2 G
    elements in llama.cpp's parser."""
    item = '"' + "x" * 1000 + '"{2000} '
    r = srv.post("/completion", {"prompt": "hi", "n_predict": 2, "grammar": "root ::= " + item * 1000},
                 timeout=QUICK)
    refused(r, "repetitions", str(1 << 20))
    still_serving(srv)


def test_schema_bombs_refused(srv):
    """A JSON Schema enum of 20,000 values is a grammar of 20,000 alternatives (was accepted
    and slow); a schema 150 levels deep is refused before the converter recurses into it."""
    wide = {"enum": [f"value {i}" for i in range(20_000)]}
    chat = {"messages": HI, "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"schema": wide}}}
    refused(srv.post("/v1/chat/completions", chat, timeout=QUICK),
            "response_format.json_schema.schema", "alternatives", "1024")
    refused(srv.post("/completion", {"prompt": "hi", "n_predict": 2, "json_schema": wide}, timeout=QUICK),
            "json_schema", "1024")
    deep = {**chat, "response_format": {"type": "json_schema", "json_schema": {"schema": schema_items(150)}}}
    refused(srv.post("/v1/chat/completions", deep, timeout=QUICK), "128 levels")


def test_deep_tool_schema_refused(srv):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": schema_items(400)}}}}]
    for choice in ("auto", "required"):
        r = srv.post("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "tools": tools,
                                              "tool_choice": choice}, timeout=QUICK)
        refused(r, "tools", "128 levels")
    r = srv.post("/apply-template", {"messages": HI, "tools": tools}, timeout=QUICK)
    refused(r, "tools", "128 levels")


def test_realistic_grammars_accepted(srv):
    """The limits are not too tight: llama.cpp's sample grammars and 64 distinct tools (a
    grammar of ~80 KB, ~1,500 rules) are served."""
    for name in ("json.gbnf", "c.gbnf", "chess.gbnf", "english.gbnf"):
        path = LLAMA_GRAMMARS / name
        if not path.exists():
            pytest.skip("llama.cpp's source is not fetched")
        r = srv.post("/completion", {"prompt": "hi", "n_predict": 2, "grammar": path.read_text()})
        assert r.status_code == 200, (name, r.text[:300])
    # the 64 tools render a prompt of ~33,000 tokens: past this server's slots, so the answer
    # is the context's refusal, which comes after every limit and libllama's parse of the grammar
    tools = [_tool(i) for i in range(64)]
    r = srv.post("/v1/chat/completions", {"messages": HI, "max_tokens": 8, "tools": tools,
                                          "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "exceed_context_size_error", r.text[:300]
    enum = {"enum": [f"value {i}" for i in range(1000)]}
    r = srv.post("/completion", {"prompt": "hi", "n_predict": 2, "json_schema": enum})
    assert r.status_code == 200, r.text[:300]


def _tool(i: int) -> dict:
    props = {
        f"query_{i}": {"type": "string", "description": "what to look for"},
        f"limit_{i}": {"type": "integer", "minimum": 1, "maximum": 1000},
        f"mode_{i}": {"type": "string", "enum": [f"m{i}_{j}" for j in range(20)]},
        f"when_{i}": {"type": "string", "format": "date-time"},
        f"tags_{i}": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+(-[a-z0-9]+)*$"},
                      "maxItems": 10},
        f"nested_{i}": {"type": "object", "required": ["a"], "properties": {
            "a": {"type": "number"}, "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "c": {"type": "array", "items": {"type": "object", "properties": {
                "x": {"type": "boolean"}, "y": {"type": "string", "minLength": 2, "maxLength": 64}}}}}},
    }
    return {"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 200, "parameters": {
        "type": "object", "properties": props, "required": [f"query_{i}"]}}}


# -- counts and sizes ------------------------------------------------------------------------

def test_n_probs_capped_and_memory_returned(srv):
    for body in ({"n_probs": 1_000_000}, {"n_probs": 101}, {"logprobs": 101}):
        r = srv.post("/completion", {"prompt": "hi", "n_predict": 8, **body}, timeout=QUICK)
        refused(r, "100")
    r = srv.post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 1000}, timeout=QUICK)
    refused(r, "100")
    body = {"prompt": "hi", "n_predict": 32, "n_probs": 100}
    r = srv.post("/completion", body)  # the first one warms the allocator up
    assert r.status_code == 200
    probs = r.json()["completion_probabilities"]
    assert probs and all(len(p["top_logprobs"]) == 100 for p in probs)
    before = proc_rss_kb(srv.proc.pid)
    for _ in range(3):
        assert srv.post("/completion", body).status_code == 200
    grown = proc_rss_kb(srv.proc.pid) - before
    assert grown < 50_000, f"RSS grew by {grown} KiB"


def test_100k_messages_refused_fast(srv):
    raw = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 1})
    t0 = time.perf_counter()
    r = srv.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"},
                 timeout=QUICK)
    took = time.perf_counter() - t0
    refused(r, "messages", "4096")
    assert took < 1.0, took


@pytest.mark.parametrize("body, words", [
    ({"tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]}, ("tools", "128")),
    ({"stop": ["x" * 2000]}, ("stop", "1024 bytes")),
    ({"stop": [f"s{i}" for i in range(65)]}, ("stop", "64")),
    ({"logit_bias": {str(i): 1.0 for i in range(5000)}}, ("logit_bias", "4096")),
    ({"logit_bias": [["x" * 2000, 1.0]]}, ("logit_bias", "1024 bytes")),
    ({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}, ("messages", str(4 << 20))),
])
def test_counts_and_sizes_bounded(srv, body, words):
    r = srv.post("/v1/chat/completions", {"messages": HI, "max_tokens": 2, **body}, timeout=QUICK)
    refused(r, *words)


# -- bad strings -----------------------------------------------------------------------------

NASTY = ["x\u0000\ud83d", "\udc00", "\ud800\ud800", "a\u0000b", "\U0001F600\u0000"]


def _bodies(s: str) -> list[tuple[str, dict]]:
    """A nasty string in every string field of every endpoint that reads a body."""
    msgs = [{"role": "user", "content": s}]
    tool = {"type": "function", "function": {"name": "f", "description": s, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "description": s}}}}}
    return [
        ("/tokenize", {"content": s, "with_pieces": True}),
        ("/tokenize", {"content": s}),
        ("/detokenize", {"tokens": [1, 2], s: s}),
        ("/completion", {"prompt": s, "n_predict": 1}),
        ("/completion", {"prompt": [s, 2], "n_predict": 1}),
        ("/completion", {"prompt": "hi", "n_predict": 1, "stop": [s]}),
        ("/completion", {"prompt": "hi", "n_predict": 1, "grammar": f'root ::= "{s}"'}),
        ("/completion", {"prompt": "hi", "n_predict": 1, "logit_bias": {s: 1.0}}),
        ("/completion", {"prompt": "hi", "n_predict": 1, "json_schema": {"enum": [s]}}),
        ("/v1/completions", {"prompt": s, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "tools": [tool]}),
        ("/v1/chat/completions", {"messages": [{"role": s, "content": "hi"}], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "chat_template_kwargs": {s: s}}),
        ("/apply-template", {"messages": msgs}),
        ("/v1/chat/completions/input_tokens", {"messages": msgs}),
        ("/v1/embeddings", {"input": s}),
        ("/embedding", {"content": [s, "ok"]}),
    ]


def test_bad_strings_never_a_500(srv):
    """Lone surrogates are a 400 everywhere (llama-server's JSON parser refuses them; a 500
    there); NUL characters are ordinary text. Never a 5xx."""
    bad = []
    for s in NASTY:
        lone = any(0xD800 <= ord(c) <= 0xDFFF for c in s)
        for path, body in _bodies(s):
            r = srv.post(path, body, timeout=120)
            if r.status_code >= 500 or (lone and r.status_code != 400):
                bad.append((repr(s), path, r.status_code, r.text[:120]))
    assert not bad, bad
    still_serving(srv)


def test_tokenize_pieces_with_nul(srv):
    r = srv.post("/tokenize", {"content": "x\u0000y", "with_pieces": True})
    assert r.status_code == 200, r.text
    assert "".join(t["piece"] for t in r.json()["tokens"]) == "x\u0000y"
    r = srv.post("/tokenize", data=b'{"content": "x\\u0000\\ud83d", "with_pieces": true}')
    refused(r, "surrogate")
