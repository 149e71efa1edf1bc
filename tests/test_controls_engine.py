"""Issue 31's engine-side request controls on the real model: t_max_predict_ms, n_indent,
context shift (n_keep / n_discard), n_cache_reuse, --cache-idle-slots, and the request fields
and flags that set them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import N_THREADS, ROOT
from llama_lib import Engine, EngineConfig, FinishReason, RequestParams, SamplingParams
from server_util import served

GREEDY = SamplingParams(temperature=0)
STORY = "User:\nWrite a long essay on the history of Rome, with many details.\nAssistant:\n"
# 186 tokens: most of a 256-cell slot, so that a few dozen generated tokens fill it
LONG = ("User:\nSummarise this text.\n" + "Rome grew from a small town on the Tiber into an empire "
        "that ruled the Mediterranean for centuries. " * 9 + "\nAssistant:\n")


def make_engine(model, **kw) -> Engine:
    # 512 cells over one slot's sequence, the system prompt's and none else: a slot of 256
    # cells, which Gemma 3's sliding-window cache (window 512) holds whole, so it can shift
    cfg = dict(n_parallel=1, n_ctx=512, n_threads=N_THREADS, n_threads_batch=N_THREADS,
               warmup=False, cache_ram_mib=0)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def greedy(n: int, **kw) -> RequestParams:
    kw.setdefault("sampling", GREEDY)
    return RequestParams(n_predict=n, **kw)


# -- t_max_predict_ms ---------------------------------------------------------------------------

def test_t_max_predict_ms_stops_at_the_first_newline_past_the_limit(model):
    limit_ms = 400
    with make_engine(model) as e:
        # every token is newlines, so the rule stops at the first token sampled past the limit
        r = e.submit(STORY, greedy(500, ignore_eos=True, t_max_predict_ms=limit_ms,
                                   sampling=SamplingParams(temperature=0, grammar='root ::= [\\n]+')))
        ends = []  # after each step: (time, tokens generated)
        while e.has_work():
            e.step()
            ends.append((time.perf_counter(), r.n_generated))
    assert r.finish_reason == FinishReason.LENGTH and 2 <= r.n_generated < 500
    t0 = r.timings.prompt_done  # the first token: where llama-server's t_gen starts
    k = next(i for i, (_, n) in enumerate(ends) if n == r.n_generated)  # the step that stopped
    assert ends[k][0] - t0 > limit_ms / 1000, "stopped before the limit"
    # the token before the last was sampled within the limit (else it would have stopped):
    # the step before it ended within the limit, so the stop came within one step of it
    if k >= 2:
        assert ends[k - 2][0] - t0 <= limit_ms / 1000


def test_t_max_predict_ms_waits_for_a_newline(model):
    with make_engine(model) as e:
        r = e.submit(STORY, greedy(24, ignore_eos=True, t_max_predict_ms=1,
                                   sampling=SamplingParams(temperature=0, grammar='root ::= [a-z ]+')))
        e.run_until_idle()
    assert r.finish_reason == FinishReason.LENGTH and r.n_generated == 24  # n_predict's end


# -- n_indent ------------------------------------------------------------------------------------

CODE = "def f(x):\n    y = x + 1\n    return y\nprint(f(2))\nz = 3\n"


def _code(model, n_indent: int):
    gbnf = 'root ::= "' + CODE.replace("\n", "\\n") + '"'
    with make_engine(model) as e:
        r = e.submit("User:\nWrite a Python function.\nAssistant:\n",
                     greedy(64, n_indent=n_indent, sampling=SamplingParams(temperature=0, grammar=gbnf)))
        e.run_until_idle()
    return r


def test_n_indent_stops_at_a_less_indented_line_and_cuts_it(model):
    free = _code(model, 0)
    assert free.text == CODE and free.finish_reason == FinishReason.EOS
    r = _code(model, 4)
    # the first line is not checked; "print(...)" is indented by 0 < 4: cut, and the end
    assert r.finish_reason == FinishReason.LENGTH
    assert r.text == "def f(x):\n    y = x + 1\n    return y\n"
    assert r.n_generated < free.n_generated


# -- context shift -------------------------------------------------------------------------------

def test_context_shift_keeps_generating_with_n_keep(model):
    with make_engine(model, context_shift=True) as e:
        assert e.cache.can_shift  # a 256-cell slot: Gemma 3's window cache is full size
        n_slot = e.n_ctx_slot
        n_first = n_slot - 1 - 186  # tokens before the first shift, which drops (255 - 9) // 2
        r = e.submit(LONG, greedy(n_first + (n_slot - 1 - 9) // 2 + 5, ignore_eos=True, n_keep=8))
        e.run_until_idle()
        s = e.slots[0]
        assert len(r.prompt_tokens) == 186
        assert r.finish_reason == FinishReason.LENGTH and r.n_generated == r.params.n_predict, r.error
        assert r.truncated and s.n_shifted == 2 * ((n_slot - 1 - 9) // 2)  # two shifts
        # the sequence holds BOS + the first 8 prompt tokens, then the latest tokens, in order
        cache = s.cache_tokens
        assert len(cache) == e.seq_pos_max(s.seq_id) + 1 < n_slot
        assert cache[:9].tolist() == r.prompt_tokens[:9].tolist()
        assert cache[9:].tolist() == (r.prompt_tokens.tolist() + r.tokens[:-1])[-(len(cache) - 9):]
        last = r.tokens[-1]
        # the slot's cache stays usable: the same tokens again are all found cached
        again = e.submit(cache, greedy(1))
        e.run_until_idle()
        assert again.n_cached_tokens == len(cache) - 1
    # the shifted KV is what a fresh decode of those tokens gives: the same next token
    with make_engine(model) as f:
        fresh = f.submit(cache, greedy(1, cache_prompt=False))
        f.run_until_idle()
    assert fresh.tokens == [last]


def test_context_shift_n_discard(model):
    with make_engine(model, context_shift=True) as e:
        r = e.submit(LONG, greedy(e.n_ctx_slot - 186 + 20, ignore_eos=True, n_keep=-1, n_discard=7))
        e.run_until_idle()
        s = e.slots[0]
        assert r.n_generated == r.params.n_predict and s.n_shifted % 7 == 0 and s.n_shifted >= 21
        # n_keep -1: the whole prompt (and BOS) stays
        assert s.cache_tokens[:186].tolist() == r.prompt_tokens.tolist()


def test_without_context_shift_a_full_slot_ends_as_llama_server(model):
    with make_engine(model) as e:
        r = e.submit(LONG, greedy(-1, ignore_eos=True))
        e.run_until_idle()
    # llama-server stops when the next token would take the slot's last cell
    assert r.finish_reason == FinishReason.LENGTH and r.truncated
    assert len(r.prompt_tokens) + r.n_generated == e.n_ctx_slot


def test_context_shift_off_where_the_memory_cannot_shift(model):
    # 4096 cells: the sliding-window cache is smaller than the full one, llama.cpp cannot shift
    with make_engine(model, n_ctx=4096, context_shift=True) as e:
        assert not e.cache.can_shift
        r = e.submit(LONG, greedy(4, ignore_eos=True, n_cache_reuse=8))
        e.run_until_idle()
        assert r.n_generated == 4 and not r.truncated


# -- cache reuse ---------------------------------------------------------------------------------

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
HEAD = "User:\nHere is a list of words: " + " ".join(WORDS) + ".\n"
MIDDLE = "The weather today is sunny and warm with a light breeze from the sea.\n"
TAIL = ("Now repeat the list of words in reverse order, then say which one is the longest "
        "word of them all, and explain why.\nAssistant:\n")


@pytest.mark.parametrize("reuse", [0, 16])
def test_cache_reuse_moves_cached_chunks(model, reuse):
    with make_engine(model) as e:
        e.submit(HEAD + MIDDLE + TAIL, greedy(4))
        e.run_until_idle()
        # the middle removed: the tail is found further on in the slot's cache
        r = e.submit(HEAD + TAIL, greedy(8, n_cache_reuse=reuse))
        e.run_until_idle()
        s = e.slots[0]
        n = len(r.prompt_tokens)
        if reuse:
            assert r.n_prompt_tokens == 1 and r.n_cached_tokens == n - 1  # only the last again
        else:
            assert r.n_prompt_tokens > 20  # the tail decoded again
        # KV holds exactly the prompt and the generated tokens, at contiguous positions
        assert e.seq_pos_max(s.seq_id) == n + r.n_generated - 2
        assert len(s.cache_tokens) == n + r.n_generated - 1
        assert r.finish_reason == FinishReason.LENGTH


# -- cache idle slots ----------------------------------------------------------------------------

def test_cache_idle_slots_saves_and_clears_idle_slots(model):
    long = HEAD + MIDDLE + TAIL
    with make_engine(model, n_parallel=2, n_ctx=1024, kv_unified=True, cache_ram_mib=64,
                     cache_idle_slots=True, prefix_share=False) as e:
        a = e.submit(long, greedy(4, slot=0))
        e.run_until_idle()
        assert e.seq_pos_max(e.slots[0].seq_id) > 0
        b = e.submit("The quick brown fox", greedy(4, slot=1))
        e.run_until_idle()
        assert e.seq_pos_max(e.slots[0].seq_id) == -1  # unified KV: the idle slot was cleared
        assert e.cache.ram.stats.n_saved == 1
        c = e.submit(long, greedy(4))
        e.run_until_idle()
        assert c.n_cached_tokens > len(a.prompt_tokens) // 2  # loaded back from RAM
        assert b.finish_reason == FinishReason.LENGTH


# -- the server: fields, flags, answers ----------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("controls") / "server.log"
    with served(["-np", "1", "-c", "256", "-t", str(N_THREADS), "-tb", str(N_THREADS),
                 "--context-shift", "--keep", "4", "--no-warmup"], log, show_log=True) as s:
        yield s


def test_server_context_shift_answer(srv):
    r = srv.post("/completion", {"prompt": LONG, "n_predict": 100, "ignore_eos": True,
                                 "temperature": 0, "n_discard": 16, "t_max_prompt_ms": 5})
    assert r.status_code == 200, r.text
    j = r.json()  # 186 + 100 tokens in a 256-cell slot
    assert j["timings"]["predicted_n"] == 100 and j["truncated"] is True
    assert j["generation_settings"]["n_keep"] == 4 and j["generation_settings"]["n_discard"] == 16


def test_server_short_answer_not_truncated(srv):
    j = srv.post("/completion", {"prompt": "Hi", "n_predict": 4, "n_keep": -1}).json()
    assert j["truncated"] is False and j["generation_settings"]["n_keep"] == -1


@pytest.mark.parametrize("field,value", [("n_keep", -2), ("n_discard", -1), ("n_indent", "4"),
                                         ("t_max_predict_ms", 1.5), ("n_cache_reuse", -1),
                                         ("t_max_prompt_ms", "x"), ("parse_tool_calls", True),
                                         ("chat_parser", "peg")])
def test_server_refuses_bad_control_values(srv, field, value):
    r = srv.post("/completion", {"prompt": "Hi", "n_predict": 2, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"]
    assert srv.post("/completion", {"prompt": "Hi", "n_predict": 1}).status_code == 200


def test_a_shifted_live_request_shares_what_its_sequence_holds(model):
    # a second request copies its prefix from a generating slot that shifted: only what that
    # sequence still holds (BOS and n_keep tokens, then the newest), never the dropped run
    with make_engine(model, n_parallel=2, n_ctx=768, context_shift=True) as e:
        assert e.cache.can_shift
        a = e.submit(LONG, greedy(400, ignore_eos=True, n_keep=8))
        for _ in range(1000):
            if e.slots[0].n_shifted:
                break
            e.step()
        s = e.slots[0]
        assert s.n_shifted > 0
        b = e.submit(LONG, greedy(4))  # its prompt: the first 9 tokens are still held, no more
        e.step()
        assert b.n_cached_tokens <= 9  # (too few to be worth sharing: 0)
        a.cancel()
        e.run_until_idle()
        assert b.finish_reason == FinishReason.LENGTH
