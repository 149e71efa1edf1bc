"""Token probabilities: the engine's n_probs, llama-server's completion_probabilities and
OpenAI's logprobs, on the real model (no mocks).

Engine level: every generated token's logprob and top list must equal numpy's log-softmax of
the very logits row it was sampled from (read from the context right after each step).
Server level: one small server (-np 1) answers /completion, /v1/chat/completions and
/v1/completions with the probabilities aligned to the generated text.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, FinishReason, RequestParams, SamplingParams
from server_util import served

PROMPT = "The capital of France is"


def make_engine(model) -> Engine:
    return Engine(model, EngineConfig(n_parallel=1, n_ctx=512, n_threads=N_THREADS,
                                      n_threads_batch=N_THREADS))


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


# -- engine -------------------------------------------------------------------------------------

def test_greedy_probs_match_the_logits_row(model):
    n_probs, n_predict = 5, 4
    with make_engine(model) as e:
        r = e.submit(PROMPT, RequestParams(n_predict=n_predict, n_probs=n_probs, ignore_eos=True,
                                           sampling=SamplingParams(temperature=0)))
        rows = []
        while not r.done:
            before = r.n_generated
            e.step()
            if r.n_generated > before:  # this step sampled from the last output row
                rows.append(log_softmax(e.ctx.logits(-1)))
        chunks = list(r)
    assert r.finish_reason == FinishReason.LENGTH and len(r.tokens) == n_predict
    assert len(rows) == n_predict and len(r.probs) == n_predict
    assert [p.token for p in r.probs] == r.tokens
    for p, ls in zip(r.probs, rows):
        ids = [t for t, _ in p.top]
        lps = [lp for _, lp in p.top]
        assert len(p.top) == n_probs
        assert ids[0] == p.token == int(np.argmax(ls)), "greedy picks the top-1"
        assert p.logprob == pytest.approx(ls[p.token], abs=1e-4)
        assert lps == sorted(lps, reverse=True)
        assert ids == list(np.argsort(-ls, kind="stable")[:n_probs])
        assert np.allclose(lps, ls[ids], atol=1e-4)
        assert all(lp <= 0 for lp in lps)
        assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-6
    # per-chunk probs are aligned with the chunk's tokens, and carry the chunk's text
    with_tokens = [c for c in chunks if c.tokens]
    assert all(len(c.probs) == len(c.tokens) for c in with_tokens)
    assert [p for c in with_tokens for p in c.probs] == r.probs
    assert "".join(p.text for p in r.probs) == r.text


def test_without_n_probs_nothing_is_computed(model):
    with make_engine(model) as e:
        r = e.submit(PROMPT, RequestParams(n_predict=3, ignore_eos=True,
                                           sampling=SamplingParams(temperature=0)))
        e.run_until_idle()
        chunks = list(r)
    assert len(r.tokens) == 3 and r.probs == []
    assert all(c.probs is None for c in chunks)


def test_held_back_tokens_keep_their_probs(model):
    """A stop string that ends the text: the tokens held back while it might match still have
    their probabilities, with the text that was (not) sent with them."""
    with make_engine(model) as e:
        free = e.submit(PROMPT, RequestParams(n_predict=6, ignore_eos=True,
                                              sampling=SamplingParams(temperature=0)))
        e.run_until_idle()
        words = free.text.split()
        assert len(words) >= 2, free.text
        stop = words[1]
        r = e.submit(PROMPT, RequestParams(n_predict=6, ignore_eos=True, stop=[stop], n_probs=2,
                                           sampling=SamplingParams(temperature=0)))
        e.run_until_idle()
    assert r.finish_reason == FinishReason.STOP
    assert [p.token for p in r.probs] == r.tokens
    assert "".join(p.text for p in r.probs) == r.text
    assert stop not in r.text


# -- server -------------------------------------------------------------------------------------

THREADS = os.environ.get("TEST_THREADS", "2")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("logprobs") / "server.log"
    with served(["-np", "1", "-c", "512", "-t", THREADS, "-tb", THREADS], log, show_log=True) as s:
        yield s


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def check_entry(e: dict, n_top: int) -> None:
    assert isinstance(e["id"], int) and isinstance(e["token"], str)
    assert e["bytes"] == list(e["token"].encode())
    assert e["logprob"] <= 0
    assert len(e["top_logprobs"]) == n_top
    lps = [t["logprob"] for t in e["top_logprobs"]]
    assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-6
    for t in e["top_logprobs"]:
        assert set(t) == {"id", "token", "bytes", "logprob"}
        assert isinstance(t["bytes"], list) and isinstance(t["token"], str)
    # greedy in all these tests: the chosen token is the most probable one
    assert e["top_logprobs"][0]["id"] == e["id"]
    assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])


def test_completion_probabilities(srv):
    body = {"prompt": PROMPT, "n_predict": 5, "n_probs": 3, "temperature": 0, "ignore_eos": True,
            "return_tokens": True}
    res = ok(srv.post("/completion", body))
    probs = res["completion_probabilities"]
    assert [e["id"] for e in probs] == res["tokens"] and len(probs) == 5
    for e in probs:
        check_entry(e, 3)
    assert "".join(e["token"] for e in probs) == res["content"]
    assert res["generation_settings"]["n_probs"] == 3

    events = srv.stream("/completion", body)
    partial = [ev for ev in events if not ev["stop"]]
    assert len(partial) == 5
    for ev in partial:
        assert len(ev["completion_probabilities"]) == 1
        assert ev["completion_probabilities"][0]["id"] == ev["tokens"][0]
        check_entry(ev["completion_probabilities"][0], 3)
    assert [ev["completion_probabilities"][0] for ev in partial] == probs
    assert "completion_probabilities" not in events[-1]

    plain = ok(srv.post("/completion", {k: v for k, v in body.items() if k != "n_probs"}))
    assert "completion_probabilities" not in plain
    assert plain["content"] == res["content"]


def test_chat_logprobs(srv):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 4}
    res = ok(srv.post("/v1/chat/completions", body))
    choice = res["choices"][0]
    content = choice["logprobs"]["content"]
    assert 0 < len(content) <= res["usage"]["completion_tokens"]
    for e in content:
        check_entry(e, 4)
    assert "".join(e["token"] for e in content) == choice["message"]["content"]

    events = srv.stream("/v1/chat/completions", body)
    text, spelled = "", ""
    for ev in events[1:]:
        if ev == "[DONE]" or not ev["choices"]:
            continue
        c = ev["choices"][0]
        if c["finish_reason"] is None:
            text += c["delta"]["content"]
            for e in c["logprobs"]["content"]:
                check_entry(e, 4)
                spelled += e["token"]
    assert text == spelled == choice["message"]["content"]

    # logprobs without top_logprobs: 20 candidates (llama-server's default)
    res = ok(srv.post("/v1/chat/completions", {**body, "top_logprobs": None, "max_tokens": 1}))
    assert len(res["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20
    plain = ok(srv.post("/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}))
    assert plain["choices"][0]["logprobs"] is None


def test_oai_completion_logprobs(srv):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    res = ok(srv.post("/v1/completions", body))
    content = res["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for e in content:
        check_entry(e, 2)
    assert "".join(e["token"] for e in content) == res["choices"][0]["text"]
    events = [ev for ev in srv.stream("/v1/completions", body) if ev != "[DONE]"]
    streamed = [ev["choices"][0]["logprobs"]["content"][0] for ev in events
                if ev["choices"][0]["finish_reason"] is None and ev["choices"][0]["text"]]
    assert streamed == content


@pytest.mark.parametrize("path,body", [
    ("/completion", {"n_probs": -1}),
    ("/completion", {"n_probs": "3"}),
    ("/v1/completions", {"logprobs": True}),
    ("/v1/chat/completions", {"top_logprobs": 3}),            # without logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}),
    ("/v1/chat/completions", {"logprobs": "yes"}),
])
def test_bad_probability_fields(srv, path, body):
    base = ({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
            else {"prompt": PROMPT})
    r = srv.post(path, {**base, "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
