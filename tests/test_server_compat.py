"""llama-server / OpenAI compatibility of `python -m server`: response shapes and small endpoints.

Real server processes on the default model (no mocks). Two servers: `srv` (-np 2, --metrics,
--cors-origin localhost, two aliases and tags) for the API, and `keyed` (--api-key,
--cors-origin '*', --props) for CORS before the key check and POST /props.
Greedy sampling and small n_predict keep it short on two cores.
"""

from __future__ import annotations

import os
import time

import pytest
import requests

from server_util import http_json, served

THREADS = os.environ.get("TEST_THREADS", "2")
PROMPT = "User: What is the capital of France?\nAssistant:"
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}]
KEY = "compat-key"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("compat") / "server.log"
    with served(["-np", "2", "-c", "2048", "-t", THREADS, "-tb", THREADS, "--metrics", "--cors-origin",
                 "localhost", "-a", "compat-b,compat-a", "--tags", "chat,small"], log, show_log=True) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    log = tmp_path_factory.mktemp("compat-keyed") / "server.log"
    with served(["-np", "1", "-c", "512", "-t", THREADS, "-tb", THREADS, "--api-key", KEY,
                 "--cors-origin", "*", "--props"], log, api_key=KEY) as s:
        yield s


def ok(r: requests.Response) -> dict | list:
    assert r.status_code == 200, r.text
    return r.json()


def error(r: requests.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == type_ and isinstance(err["message"], str)
    return err


def completion(srv, **kw) -> dict:
    return ok(srv.post("/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, **kw}))


# -- OpenAI shapes ------------------------------------------------------------------------------

def test_oai_fingerprint_and_chat_stream_shapes(srv):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    c = ok(srv.post("/v1/chat/completions", body))
    assert c["system_fingerprint"].startswith("b") and "usage" in c and "timings" in c

    # without stream_options.include_usage: role chunk, content chunks, finish chunk with timings
    events = srv.stream("/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert all(e["system_fingerprint"].startswith("b") for e in chunks)
    assert all("role" not in e["choices"][0]["delta"] for e in chunks[1:])
    assert not any("usage" in e for e in chunks)
    last = chunks[-1]
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert last["timings"]["predicted_n"] == 6
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in chunks)
    assert text == c["choices"][0]["message"]["content"]

    # with it: the finish chunk, then a chunk without choices carrying usage and timings
    events = srv.stream("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "chat.completion.chunk"
    u = usage_chunk["usage"]
    assert (u["completion_tokens"], u["prompt_tokens"]) == (6, c["usage"]["prompt_tokens"])
    assert usage_chunk["timings"]["predicted_n"] == 6
    finish = chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    assert "usage" not in finish and "timings" not in finish
    assert len({e["id"] for e in chunks + [usage_chunk]}) == 1


def test_oai_completions_stream_keeps_usage(srv):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    c = ok(srv.post("/v1/completions", body))
    assert c["system_fingerprint"].startswith("b")
    events = srv.stream("/v1/completions", body)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == c["usage"]["completion_tokens"] == 4
    assert all("usage" not in e for e in events[:-2])


def test_verbose_embeds_the_completion_object(srv):
    body = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    c = ok(srv.post("/v1/chat/completions", {**body, "verbose": True}))
    v = c["__verbose"]
    assert "You answer briefly." in v["prompt"] and v["prompt"].rstrip().endswith("Assistant:")
    assert v["content"] == c["choices"][0]["message"]["content"] and v["tokens_predicted"] == 2
    assert "__verbose" not in ok(srv.post("/v1/chat/completions", body))
    events = srv.stream("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "verbose": True})
    assert events[-2]["__verbose"]["stop"] is True


# -- logit_bias, ignore_eos, timings ------------------------------------------------------------

def test_logit_bias_text_keys_are_tokenized(srv):
    base = completion(srv, n_predict=4, return_tokens=True)
    first = base["tokens"][0]
    piece = ok(srv.post("/detokenize", {"tokens": [first]}))["content"]
    want = ok(srv.post("/tokenize", {"content": piece, "parse_special": False}))["tokens"]
    assert want  # the piece tokenizes to something (usually itself)
    for bias in ({piece: -100}, [[piece, -100]], [[piece, False]]):
        r = completion(srv, n_predict=4, return_tokens=True, logit_bias=bias)
        listed = r["generation_settings"]["logit_bias"]
        value = None if isinstance(bias, list) and bias[0][1] is False else -100
        assert listed == [{"bias": value, "token": t} for t in dict.fromkeys(want)]
        if want == [first]:
            assert r["tokens"][0] != first  # the banned token is not sampled any more
    # token ids keep working; entries for the same token add up
    r = completion(srv, n_predict=1, logit_bias=[[first, -5], [first, -5]])
    assert r["generation_settings"]["logit_bias"] == [{"bias": -10.0, "token": first}]
    error(srv.post("/completion", {"prompt": PROMPT, "logit_bias": {"x": "a"}}), 400, "invalid_request_error")


def test_ignore_eos_bans_and_lists_eog_tokens(srv):
    eos = ok(srv.post("/tokenize", {"content": "<eos>", "parse_special": True}))["tokens"]
    assert len(eos) == 1
    r = completion(srv, n_predict=2, ignore_eos=True)
    lb = r["generation_settings"]["logit_bias"]
    assert lb and all(e["bias"] is None for e in lb)
    assert eos[0] in {e["token"] for e in lb}
    assert completion(srv, n_predict=2)["generation_settings"]["logit_bias"] == []
    gs = r["generation_settings"]
    for k in ("adaptive_target", "adaptive_decay", "dry_multiplier", "mirostat", "n_keep", "grammar"):
        assert k in gs


def test_generation_rate_excludes_first_token(srv):
    t = completion(srv, n_predict=1)["timings"]
    assert t["predicted_n"] == 1
    assert t["predicted_per_second"] == 0.0 and t["predicted_per_token_ms"] == 0.0
    t = completion(srv, n_predict=8, ignore_eos=True)["timings"]
    assert t["predicted_n"] == 8 and t["predicted_ms"] > 0
    assert abs(t["predicted_per_second"] - 1e3 / t["predicted_ms"] * 7) < 1e-6
    assert abs(t["predicted_per_token_ms"] - t["predicted_ms"] / 7) < 1e-9


# -- /completion fields -------------------------------------------------------------------------

def test_return_tokens_response_fields_and_id_slot(srv):
    r = completion(srv, n_predict=6, ignore_eos=True, return_tokens=True)
    assert len(r["tokens"]) == 6 and all(isinstance(t, int) for t in r["tokens"])
    assert ok(srv.post("/detokenize", {"tokens": r["tokens"]}))["content"] == r["content"]
    assert completion(srv, n_predict=2)["tokens"] == []
    assert r["prompt"].endswith(PROMPT) and r["prompt"] != PROMPT  # decoded, BOS written out

    fields = ["content", "generation_settings/n_predict", "timings/predicted_n", "no/such"]
    p = completion(srv, n_predict=3, response_fields=fields)
    assert set(p) == {"content", "generation_settings/n_predict", "timings/predicted_n"}
    assert p["generation_settings/n_predict"] == 3 and p["content"] == completion(srv, n_predict=3)["content"]

    assert completion(srv, n_predict=1, id_slot=1)["id_slot"] == 1
    error(srv.post("/completion", {"prompt": PROMPT, "id_slot": 2}), 400, "invalid_request_error")


# -- chat validation, prefill, templates --------------------------------------------------------

def test_chat_validation_and_assistant_prefill(srv):
    two = MESSAGES + [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    error(srv.post("/v1/chat/completions", {"messages": two}), 400, "invalid_request_error")
    prefill = MESSAGES + [{"role": "assistant", "content": "The capital"}]
    error(srv.post("/v1/chat/completions", {"messages": prefill, "continue_final_message": True,
                                             "add_generation_prompt": True}), 400, "invalid_request_error")

    tmpl = ok(srv.post("/apply-template", {"messages": prefill}))["prompt"]
    assert tmpl.endswith("\nAssistant: The capital")
    c = ok(srv.post("/v1/chat/completions", {"messages": prefill, "max_tokens": 3, "temperature": 0,
                                             "verbose": True}))
    assert c["__verbose"]["prompt"].endswith(tmpl)
    # the explicit spelling gives the same prompt
    c2 = ok(srv.post("/v1/chat/completions", {"messages": prefill, "max_tokens": 3, "temperature": 0,
                                              "continue_final_message": True, "add_generation_prompt": False,
                                              "verbose": True}))
    assert c2["__verbose"]["prompt"] == c["__verbose"]["prompt"]
    assert c2["choices"][0]["message"]["content"] == c["choices"][0]["message"]["content"]
    # the continuation is the completion of the prefill text
    raw = completion(srv, prompt=tmpl, n_predict=3, stop=["\nUser:", "User:"])
    assert c["choices"][0]["message"]["content"] == raw["content"]
    # no generation prompt
    plain = ok(srv.post("/apply-template", {"messages": MESSAGES, "add_generation_prompt": False}))["prompt"]
    assert plain == "System: You answer briefly.\nUser: What is the capital of France?"


def test_apply_template_and_input_tokens(srv):
    prompt = ok(srv.post("/apply-template", {"messages": MESSAGES}))["prompt"]
    assert prompt == "System: You answer briefly.\nUser: What is the capital of France?\nAssistant:"
    n = len(ok(srv.post("/tokenize", {"content": prompt, "add_special": True}))["tokens"])
    for path in ("/chat/completions/input_tokens", "/v1/chat/completions/input_tokens"):
        assert ok(srv.post(path, {"messages": MESSAGES}))["input_tokens"] == n
    error(srv.post("/apply-template", {"messages": "hi"}), 400, "invalid_request_error")
    usage = ok(srv.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}))["usage"]
    assert usage["prompt_tokens"] == n


# -- n > 1 and several prompts -------------------------------------------------------------------

def test_n_choices_and_prompt_lists(srv):
    c = ok(srv.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "n": 2, "seed": 7,
                                             "temperature": 1.0}))
    assert [ch["index"] for ch in c["choices"]] == [0, 1]
    assert all(ch["message"]["role"] == "assistant" for ch in c["choices"])
    assert len({c["id"]}) == 1 and c["id"].startswith("chatcmpl-")
    error(srv.post("/v1/chat/completions", {"messages": MESSAGES, "n": 3}), 400, "invalid_request_error")
    one = ok(srv.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}))["usage"]
    two = ok(srv.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "n": 2}))
    assert len(two["choices"]) == 2
    assert two["usage"]["completion_tokens"] == 8 and two["usage"]["prompt_tokens"] == one["prompt_tokens"]

    a, b = "The sky is", "Water is"
    res = ok(srv.post("/completion", {"prompt": [a, b], "n_predict": 4, "temperature": 0}))
    assert isinstance(res, list) and [r["index"] for r in res] == [0, 1]
    assert res[0]["content"] == completion(srv, prompt=a, n_predict=4)["content"]
    assert res[1]["content"] == completion(srv, prompt=b, n_predict=4)["content"]

    # token ids, llama-server's {"prompt_string"} object, and strings mixed with token ids
    ids = ok(srv.post("/tokenize", {"content": a, "add_special": True}))["tokens"]
    res2 = ok(srv.post("/completion", {"prompt": [ids, {"prompt_string": a}, [ids[0], a]],
                                       "n_predict": 4, "temperature": 0}))
    assert [r["content"] for r in res2] == [res[0]["content"]] * 3
    error(srv.post("/completion", {"prompt": {"prompt_string": a, "multimodal_data": ["AAAA"]}}),
          400, "invalid_request_error")

    o = ok(srv.post("/v1/completions", {"prompt": [a, b], "max_tokens": 4, "temperature": 0}))
    assert [ch["text"] for ch in o["choices"]] == [r["content"] for r in res]

    events = srv.stream("/v1/completions", {"prompt": [a, b], "max_tokens": 4, "temperature": 0})
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        ch = e["choices"][0]
        texts[ch["index"]] += ch["text"]
    assert [texts[0], texts[1]] == [r["content"] for r in res]
    finals = [e for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(e["choices"][0]["index"] for e in finals) == [0, 1]


# -- small endpoints ------------------------------------------------------------------------------

def test_props_models_metrics_infill(srv):
    error(srv.post("/props", {}), 501, "not_supported_error")
    err = error(srv.post("/infill", {"input_prefix": "def f(", "input_suffix": ")"}), 501, "not_supported_error")
    assert err["message"].startswith("Infill is not supported by this model")

    m = ok(srv.get("/v1/models"))["data"][0]
    assert set(m["aliases"]) == {"compat-a", "compat-b"} and set(m["tags"]) == {"chat", "small"}
    assert isinstance(m["meta"]["vocab_type"], int) and m["meta"]["vocab_type"] > 0
    props = ok(srv.get("/props"))
    assert m["meta"]["ftype"] and m["meta"]["ftype"] == props["model_ftype"]
    assert "Q4_K" in props["model_ftype"]  # the default model is Q4_K_M
    assert props["endpoint_props"] is False

    r = srv.get("/metrics")
    assert r.status_code == 200
    assert abs(int(r.headers["Process-Start-Time-Unix"]) - time.time()) < 3600
    for name in ("spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total",
                 "spec_decode_num_drafts_total"):
        assert f"# TYPE llamacpp:{name} counter\nllamacpp:{name} 0\n" in r.text


def test_post_props_with_flag(keyed):
    error(keyed.post("/props", {}, headers={}), 401, "authentication_error")
    assert ok(keyed.post("/props", {})) == {"success": True}
    assert ok(keyed.get("/props"))["endpoint_props"] is True


# -- CORS and the key ---------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}


def test_cors_localhost_origins(srv):
    for origin in ("http://localhost", "http://localhost:5173", "https://127.0.0.1:8443", "http://[::1]:8080"):
        status, h, _ = http_json(srv.port, "OPTIONS", "/completions", headers={"Origin": origin, **PREFLIGHT})
        assert status == 200 and h["access-control-allow-origin"] == origin
        assert h["access-control-allow-credentials"] == "true"
        assert h["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
        assert h["access-control-allow-headers"] == "*"
    for origin in ("http://evil.example", "http://localhost.evil.example", "null"):
        status, h, _ = http_json(srv.port, "OPTIONS", "/completions", headers={"Origin": origin, **PREFLIGHT})
        assert status == 200 and "access-control-allow-origin" not in h
    status, h, _ = http_json(srv.port, "GET", "/health", headers={"Origin": "http://localhost:3000"})
    assert status == 200 and h["access-control-allow-origin"] == "http://localhost:3000"
    status, h, _ = http_json(srv.port, "GET", "/health", headers={"Origin": "http://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in h


def test_cors_preflight_before_the_key(keyed):
    origin = "https://app.example"
    status, h, _ = http_json(keyed.port, "OPTIONS", "/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})
    assert status == 200 and h["access-control-allow-origin"] == origin  # '*' with credentials echoes
    assert "Authorization" in h["access-control-allow-headers"]  # '*' does not cover it for browsers
    status, _, _ = http_json(keyed.port, "OPTIONS", "/no/such/path", headers={"Origin": origin})
    assert status == 200
    status, h, body = http_json(keyed.port, "GET", "/props", headers={"Origin": origin})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    # llama-server's web UI assets (not ours): 404 without the key, not 401
    for path in ("/sw.js", "/manifest.webmanifest", "/_app/version.json"):
        status, _, body = http_json(keyed.port, "GET", path)
        assert status == 404 and body["error"]["type"] == "not_found_error"
    assert http_json(keyed.port, "GET", "/")[0] == 200


def test_embeddings_need_the_flag(srv):
    """Without --embedding, the embedding routes answer llama-server's 501 and nothing else changes."""
    for path in ("/v1/embeddings", "/embedding", "/embeddings"):
        r = srv.post(path, {"input": "hello"})
        assert r.status_code == 501, path
        assert r.json()["error"]["message"] == "This server does not support embeddings. Start it with `--embeddings`"
    assert srv.get("/props").json()["embedding"] is False
