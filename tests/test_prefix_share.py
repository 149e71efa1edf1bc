"""Prefixes shared between KV sequences (prefix_share.py): a request copies the longest prompt
prefix any slot holds, and requests that arrive together with a common document decode it once.
Greedy output is the same as with sharing off (each slot decoding its whole prompt), with a
unified KV cache and without, past Gemma 3's 512-token sliding window, when the request being
waited for is cancelled, and when a small cache has to evict."""

from __future__ import annotations

import threading

import pytest

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, RequestParams, SamplingParams
from llama_lib.engine.slot import PREFILL, WAIT

WORDS = "apple river stone cloud maple harbor lantern meadow violet copper thunder willow".split()
LONG_DOC = " ".join(f"Item {i} of the list is the word {WORDS[i % 12]}." for i in range(60))  # ~700 tokens
SHORT_DOC = " ".join(f"Item {i} of the list is the word {WORDS[i % 12]}." for i in range(16))  # ~190
QUESTIONS = ["Which item is harbor?", "Which item is the word apple?", "What is item 7?", "Count the items."]
GREEDY = RequestParams(n_predict=16, sampling=SamplingParams(temperature=0), n_probs=2)
# A batch of other shape changes the float sums (measured here: up to 0.1-0.2 nats between one
# request alone and eight at once, sharing off), so two greedy runs may part at a near tie.
NEAR_TIE = 0.3


def same_greedy(got, want) -> bool:
    """Token for token, except that they may part where `want` had two nearly equal choices."""
    k = next((i for i, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b), None)
    if k is None:
        return len(got.tokens) == len(want.tokens)
    (_, best), (_, second) = want.probs[k].top[:2]
    return best - second < NEAR_TIE


def ask(doc: str, q: str) -> str:
    return f"User: Read this list.\n{doc}\n{q}\nAssistant:"


def engine(model, share: bool, kvu: bool = False, n_parallel: int = 4, n_ctx: int = 0, **kw) -> Engine:
    n_ctx = n_ctx or (4096 if kvu else 2048 * (n_parallel + 1))
    kw.setdefault("cache_ram_mib", 0)
    return Engine(model, EngineConfig(n_parallel=n_parallel, n_ctx=n_ctx, n_threads=N_THREADS,
                                      kv_unified=kvu, prefix_share=share, **kw))


def run_together(e: Engine, prompts: list[str], params: RequestParams = GREEDY) -> list:
    """Submit all, then step the engine (not started) until they are done: they arrive together."""
    hs = [e.submit(p, params) for p in prompts]
    e.run_until_idle()
    assert [h.error for h in hs] == [None] * len(hs)
    return hs


def assert_same(got: list, want: list) -> None:
    assert all(same_greedy(g, w) for g, w in zip(got, want)), [(g.text, w.text) for g, w in zip(got, want)]


@pytest.mark.parametrize("kvu", [False, True], ids=["per-slot-kv", "unified-kv"])
@pytest.mark.parametrize("doc", [SHORT_DOC, LONG_DOC], ids=["short-doc", "past-the-window"])
def test_a_document_sent_together_is_decoded_once(model, kvu, doc):
    prompts = [ask(doc, q) for q in QUESTIONS]
    with engine(model, share=False, kvu=kvu) as off:
        want = run_together(off, prompts)
        decoded_off = off.stats.n_prompt_tokens
    with engine(model, share=True, kvu=kvu) as on:
        got = run_together(on, prompts)
        st = on.share_stats()
        decoded_on = on.stats.n_prompt_tokens
    assert_same(got, want)
    assert st["n_waits"] == 3 and st["n_copies"] == 3
    n_doc = len(model.vocab.tokenize(ask(doc, ""), add_special=True))
    # the document once, then each request's own question
    assert decoded_on < decoded_off / 2 and decoded_on < n_doc + 4 * 24
    assert st["n_tokens_copied"] >= 3 * (n_doc - 8)


def test_a_new_request_copies_an_idle_slots_prefix_and_branching_chats_match(model):
    first = ask(SHORT_DOC, QUESTIONS[0])
    branches = [ask(SHORT_DOC, q) for q in QUESTIONS[1:3]]
    results = {}
    for share in (False, True):
        with engine(model, share=share, n_parallel=3) as e:
            run_together(e, [first])                      # slot 0 keeps it as its cache
            # the two branches: one goes to slot 0 (its own cache), the other to a slot whose
            # cache is empty, which copies the document from slot 0 (or decodes it, sharing off)
            results[share] = (run_together(e, branches), e.share_stats(), e.stats.n_prompt_tokens_cached)
    (want, _, cached_off), (got, st, cached_on) = results[False], results[True]
    assert_same(got, want)
    assert st["n_copies"] == 1 and st["n_waits"] == 0
    assert cached_on - cached_off == st["n_tokens_copied"] > 150


def test_a_request_joins_a_live_one_and_a_cancelled_leader_stalls_no_one(model):
    prompts = [ask(LONG_DOC, q) for q in QUESTIONS[:3]]
    with engine(model, share=False, n_parallel=3) as off:
        want = run_together(off, prompts[1:])
    with engine(model, share=True, n_parallel=3, prefill_chunk=128) as e:
        leader = e.submit(prompts[0], GREEDY)
        followers = [e.submit(p, GREEDY) for p in prompts[1:]]
        e.step()
        phases = [s.phase for s in e.slots]
        assert phases == [PREFILL, WAIT, WAIT]  # the document is decoded by the first alone
        e.step()
        leader.cancel()
        e.run_until_idle()
        assert leader.finish_reason is not None and leader.finish_reason.value == "cancelled"
        assert [h.error for h in followers] == [None, None]
        assert_same(followers, want)
        # the second follower waited for the first once the leader was gone
        assert e.share_stats()["n_waits"] == 3 and e.share_stats()["n_copies"] == 1


def test_a_live_request_gives_its_prompt_to_a_new_one(model):
    """A request arriving while another still generates copies the prompt it shares."""
    prompts = [ask(SHORT_DOC, q) for q in QUESTIONS[:2]]
    long_answer = RequestParams(n_predict=48, sampling=SamplingParams(temperature=0))
    with engine(model, share=False, n_parallel=2) as off:
        want = run_together(off, [prompts[1]])
    with engine(model, share=True, n_parallel=2) as e:
        live = e.submit(prompts[0], long_answer)
        for _ in range(4):
            e.step()  # prompt decoded, generating
        assert e.slots[0].phase.value == "generate"
        late = e.submit(prompts[1], GREEDY)
        e.run_until_idle()
        assert live.error is None and late.error is None
        assert_same([late], want)
        assert late.n_cached_tokens > 150 and e.share_stats()["n_copies"] == 1


def test_a_small_unified_cache_evicts_and_loses_no_request(model):
    """4 slots in 1,536 cells: old caches must go before the shared document fits."""
    fillers = [f"User: Tell me about {w} number {k}, " + "and more " * 60 + "\nAssistant:"
               for k, w in enumerate(WORDS[:4])]
    prompts = [ask(LONG_DOC, q) for q in QUESTIONS]
    with engine(model, share=True, kvu=True, n_ctx=1536) as e:
        run_together(e, fillers)
        texts = [h.text for h in run_together(e, prompts)]
        assert all(texts) and e.stats.n_requests_failed == 0
        assert e.share_stats()["n_copies"] >= 1


def test_the_server_reports_sharing_and_can_turn_it_off(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from server_util import served

    def counters(flags: list[str]) -> dict[str, float]:
        with served(["-np", "3", "-c", "6144", "--metrics", *flags], tmp_path / "server.log") as s:
            s.post("/completion", {"prompt": ask(SHORT_DOC, QUESTIONS[0]), "n_predict": 4, "temperature": 0})
            answers = []

            def one(q):
                answers.append(s.post("/completion", {"prompt": ask(SHORT_DOC, q), "n_predict": 4,
                                                      "temperature": 0, "id_slot": QUESTIONS.index(q)}))
            threads = [threading.Thread(target=one, args=(q,)) for q in QUESTIONS[1:3]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [r.status_code for r in answers] == [200, 200]
            assert all(r.json()["timings"]["cache_n"] > 150 for r in answers) or "--no-prefix-share" in flags
            tiers = {sl["prompt_cache"]["tier"] for sl in s.get("/slots").json()}
            if "--no-prefix-share" in flags:  # nothing shared (--cache-idle-slots may load a RAM copy)
                assert "shared" not in tiers
            else:
                assert tiers == {"shared", ""}
            return {x.name: x.value for fam in text_string_to_metric_families(s.get("/metrics").text)
                    for x in fam.samples}
    on = counters([])
    assert on["llamacpp:prefix_copies_total"] == 2 and on["llamacpp:prompt_tokens_shared_total"] > 300
    assert on["llamacpp:prompt_tokens_cached_kv_total"] >= on["llamacpp:prompt_tokens_shared_total"]
    assert on["llamacpp:prompt_tokens_cached_ram_total"] == 0 and on["llamacpp:kv_holders"] == 0  # per-slot KV
    off = counters(["--no-prefix-share"])
    assert off["llamacpp:prefix_copies_total"] == 0 and off["llamacpp:prefix_waits_total"] == 0
    # the first request's cache is copied, not held; --no-cache-idle-slots: with -kvu that flag
    # clears an idle slot (its cache goes to RAM) when a request starts, before a later one could
    # copy from it
    held = counters(["-kvu", "--kv-holders", "3", "--no-cache-idle-slots"])
    assert held["llamacpp:prefix_copies_total"] == 2 and "llamacpp:kv_holders_kept_total" in held


def test_kv_holders_flag_is_checked(capsys):
    from server.config.cli import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--kv-holders", "-2"])
    assert e.value.code == 2 and "--kv-holders" in capsys.readouterr().err
    assert parse_args(["-kvu", "--kv-holders", "0"]).kv_holders == 0


def test_a_pool_sends_requests_that_share_a_document_to_one_engine(model):
    from llama_lib import EnginePool

    cfg = EngineConfig(n_parallel=4, n_ctx=2048 * 5, n_threads=1, n_threads_batch=1, cache_ram_mib=0)
    with EnginePool.split(model, cfg, 2) as pool:
        hs = [pool.submit(ask(SHORT_DOC, q), GREEDY) for q in QUESTIONS[:2]]
        while pool.step():
            pass
        assert [h.error for h in hs] == [None, None]
        # both on the engine the first went to (least loaded would have split them)
        assert {pool.engine_of(h.slot_id) for h in hs} == {0}
        assert pool.engines[0].share_stats()["n_waits"] == 1
