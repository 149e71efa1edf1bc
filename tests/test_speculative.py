"""Speculative decoding in the engine (speculative.py, spec_verify.py, ngram_draft.py): the
n-gram drafters, batched verification across slots, the output equal to the run without
drafts, stop rules and grammars on the accepted tokens, the rejected cells gone from the KV
cache, the draft length that adapts.

"Equal" allows for one thing: llama.cpp's CPU kernels round a decode of several rows of one
sequence (the draft's verification) a little differently from a decode of one row, so where
the two best tokens of the run without drafts are within TIE logprob of each other the runs
may part there. Everywhere else they must agree token for token.

Kept fast (CI): one engine per configuration for the whole module (module fixtures), the
references taken once, short generations, short n-gram drafts (a verified row costs a logits
row over the 262k vocabulary), and the random draft is tests/tiny_model.py's model.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, FinishReason, RequestParams, SamplingParams
from llama_lib.engine.ngram_draft import NgramMod, ngram_map_k, ngram_map_k4v, ngram_simple
from llama_lib.engine.spec_params import RequestSpec, SpecParams
from llama_lib.engine.speculative import SlotSpec, StepCosts
from tiny_model import tiny_model

TIE = 0.05  # logprob gap under which the two best tokens count as a tie
N = 32      # greedy tokens per reference answer

CODE = """def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    result = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        key, value = line.split('=', 1)
        result[key.strip()] = value.strip()
    return result
"""
COPY = f"Here is a function:\n\n{CODE}\nThe same function, copied exactly:\n\n"
CHAT = "User:\nWhat is the capital of France? Tell me about it.\nAssistant:\n"
LIST = "Repeat after me ten times: one two three four five. one two three four five. one two"
PROMPTS = [COPY, CHAT, LIST]
GRAMMAR = 'root ::= ("ab" | "cd" | " ")+'
GRAMMAR_PROMPT = "ab cd ab cd ab cd ab cd ab cd ab cd ab cd"
# n-gram drafts of at most 8 tokens: long enough to show the gain, short enough to be cheap
SPEC = {t: SpecParams(types=(t,), ngram_size_n=3, ngram_size_m=8, ngram_k_size_n=3, ngram_k_size_m=8,
                      ngram_k4v_size_n=3, ngram_k4v_size_m=8, mod_n_match=3, mod_n_min=1, mod_n_max=8)
        for t in ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")}
KVU = {"ngram-simple": False, "ngram-map-k": True, "ngram-map-k4v": True, "ngram-mod": False}  # both KV layouts


def engine(model, n_parallel=3, spec=None, **kw) -> Engine:
    return Engine(model, EngineConfig(n_parallel=n_parallel, n_ctx=2048, n_threads=N_THREADS,
                                      n_threads_batch=N_THREADS, speculative=spec, **kw))


def greedy(n: int = N, **kw) -> RequestParams:
    kw.setdefault("cache_prompt", False)  # every run decodes its prompt as a fresh engine would
    return RequestParams(n_predict=n, sampling=SamplingParams(temperature=0), **kw)


def grammar_params(n: int = 20) -> RequestParams:
    return RequestParams(n_predict=n, cache_prompt=False, sampling=SamplingParams(temperature=0, grammar=GRAMMAR))


def run_all(e: Engine, prompts, params) -> list:
    hs = [e.submit(p, params() if callable(params) else params) for p in prompts]
    e.run_until_idle()
    return hs


def assert_same(ref, got) -> None:
    """got's tokens are the first of ref's (all of them when got is as long), or part from them
    only where ref's best two were a tie."""
    a, b = ref.tokens, got.tokens
    assert len(b) <= len(a)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top = ref.probs[i].top
            gap = top[0][1] - top[1][1]
            assert gap < TIE, f"token {i}: {y} instead of {x} (gap {gap:.3f}, not a tie)"
            return
    assert len(a) == len(b) and ref.finish_reason == got.finish_reason or len(b) < len(a)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy outputs without speculation, with the top two logprobs of every token: COPY
    alone, the three prompts at once, and the grammar request."""
    with engine(model) as e:
        [one] = run_all(e, [COPY], lambda: greedy(n_probs=2))
        three = run_all(e, PROMPTS, lambda: greedy(n_probs=2))
        [gram] = run_all(e, [GRAMMAR_PROMPT], grammar_params)
    return {"one": one, "three": three, "grammar": gram}


@pytest.fixture(scope="module", params=sorted(SPEC))
def spec_engine(model, request):
    """An engine of three slots per n-gram type, shared by the tests of that type."""
    kind = request.param
    with engine(model, spec=SPEC[kind], kv_unified=KVU[kind]) as e:
        yield kind, e


@pytest.fixture(scope="module")
def simple_engine(model):
    with engine(model, spec=SPEC["ngram-simple"]) as e:
        yield e


def test_ngram_drafters():
    h = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], np.int32)
    assert ngram_simple(h, 3, 4).tolist() == [7, 8, 1, 2]      # the most recent earlier "1 2 3"
    assert ngram_simple(h, 3, 4, min_hits=3).tolist() == []    # seen twice before, not three times
    assert ngram_simple(h, 4, 4).tolist() == []                # "3 1 2 3" never seen before
    h2 = np.array([1, 2, 7, 1, 2, 7, 1, 2, 8, 1, 2], np.int32)
    assert ngram_map_k(h2, 2, 2).tolist() == [7, 1]            # 7 followed "1 2" twice, 8 once
    assert ngram_simple(h2, 2, 2).tolist() == [8, 1]
    # k4v: whole 2-grams after "1 2": "7 1" twice, "8 1" once (twice the others: a draft);
    # "7 1" once and "8 1" once: no draft
    assert ngram_map_k4v(h2, 2, 2).tolist() == [7, 1]
    assert ngram_map_k4v(np.array([1, 2, 7, 1, 2, 8, 1, 2], np.int32), 2, 2).tolist() == []
    h3 = np.array([1, 2, 7, 1, 1, 2, 7, 1, 1, 2, 8, 3, 1, 2, 7, 1, 1, 2], np.int32)
    assert ngram_map_k4v(h3, 2, 2).tolist() == [7, 1]          # three times against once
    assert ngram_map_k4v(h3, 2, 2, min_hits=5).tolist() == []  # the key seen four times
    mod = NgramMod(2, 1, 8)
    mod.add(np.array([4, 5, 6, 7, 4, 5], np.int32), 0)
    assert mod.draft(np.array([0, 4, 5], np.int32), 3).tolist() == [6, 7, 4]


def test_adaptive_length_follows_acceptance(model):
    """A slot whose drafts were right drafts long alone; one whose drafts failed drafts nothing;
    a slot whose drafts are right four times in five drafts less beside seven busy slots."""
    with engine(model, n_parallel=8, spec=SPEC["ngram-simple"]) as e:
        sp, p = e.spec, e.parts
        good, bad, fair = sp.slots[0], sp.slots[1], sp.slots[2]
        good.hits, bad.misses = 30.0, 30.0
        fair.hits, fair.misses = 12.0, 3.0
        d = np.arange(20, dtype=np.int32)
        alone = sp.choose_lengths(p, e.slots[:2], {0: d, 1: d})
        assert alone.get(0, 0) >= 8 and alone.get(1, 0) == 0
        fair_alone = sp.choose_lengths(p, e.slots[2:3], {2: d}).get(2, 0)
        fair_busy = sp.choose_lengths(p, e.slots, {2: d}).get(2, 0)
        assert fair_alone >= 2 and fair_busy < fair_alone
        # once this machine's steps show a draft row costs 2.5 % of a step, the slot drafts longer
        for i in range(40):
            sp.costs.add(1, i % 5, 0.020 + 0.0005 * (i % 5))
        assert sp.choose_lengths(p, e.slots[2:3], {2: d}).get(2, 0) > fair_alone
    assert SlotSpec(hits=0, misses=0).acceptance == pytest.approx(0.75)


def test_some_slots_draft_beside_others(model, reference):
    """A stream per slot (no -kvu): a slot that drafts beside slots that do not (speculative
    n_max = 0) makes the step uneven (an extra pass, or fillers padding the others); the drafts
    still go in when the layout's cost allows (here: a draft row measured at 2.5 % of a step,
    held there), and every output is the one without drafts."""
    with engine(model, spec=SPEC["ngram-simple"]) as e:
        sp = e.spec
        for i in range(40):
            sp.costs.add(3, i % 5, 0.030 + 0.00075 * (i % 5))
        sp.costs.add = lambda *a: None  # this machine's own steps (disturbed in CI) left out
        uneven = []
        choose = sp.choose_lengths

        def spy(p, gen, drafts):
            k = choose(p, gen, drafts)
            if k and len(k) < len(gen):
                uneven.append(k)
            return k

        sp.choose_lengths = spy
        off = greedy(speculative=RequestSpec(n_max=0))
        hs = [e.submit(CHAT, off), e.submit(COPY, greedy()), e.submit(CHAT, off)]
        e.run_until_idle()
    assert_same(reference["one"], hs[1])
    assert_same(reference["three"][1], hs[0])
    assert_same(reference["three"][1], hs[2])
    assert len(uneven) >= 3 and hs[1].timings.draft_n_accepted >= 10


def test_slots_that_skip_their_drafts_explore(model, reference):
    """A draft row measured at ~28 % of a three-slot step: at the 0.75 prior no draft pays (the
    old code drafted nothing, and a slot that never verifies never learns its acceptance), so
    slots that skip their drafts grow optimistic until they verify one, and from then on the
    acceptance they measured decides. Every output is the one without drafts."""
    with engine(model, spec=SPEC["ngram-simple"]) as e:
        sp = e.spec
        for i in range(40):
            sp.costs.add(3, i % 5, 0.030 + 0.0083 * (i % 5))
        sp.costs.add = lambda *a: None  # held (this machine's own steps are disturbed in CI)
        d = np.arange(8, dtype=np.int32)
        assert sp.choose_lengths(e.parts, e.slots, {0: d, 1: d, 2: d}) == {}, "the prior alone does not pay"
        hs = run_all(e, PROMPTS, greedy)
    for ref, got in zip(reference["three"], hs):
        assert_same(ref, got)
    copy = hs[0].timings
    # at least one whole exploratory draft verified (how many more depends on the steps' order)
    assert copy.draft_n >= 8 and copy.draft_n_accepted >= 0.5 * copy.draft_n, copy


def test_step_costs_fit():
    c = StepCosts(8)
    assert c.ratio(1) is None
    for i in range(60):  # 20 ms a step, 2 ms a draft row, a little noise
        c.add(1, i % 5, 0.020 + 0.002 * (i % 5) + 0.0002 * (i % 3))
        c.add(2, 0, 0.030)  # no spread in draft rows: no slope
    assert c.ratio(1) == pytest.approx(0.1, rel=0.1)
    assert c.ratio(2) is None and c.ratio(8) is None


def test_greedy_same_with_each_spec_type(reference, spec_engine):
    """Each n-gram type: COPY alone (drafts kept, far fewer steps, the rejected cells gone
    from the KV), then the three prompts at once, as without drafts."""
    kind, e = spec_engine
    steps, acc = e.stats.n_steps, e.stats.n_draft_accepted
    [h] = run_all(e, [COPY], greedy)
    assert_same(reference["one"], h)
    assert len(h.tokens) == N
    assert h.timings.draft_n > 0 and h.timings.draft_n_accepted > 0
    assert e.stats.n_draft_accepted - acc == h.timings.draft_n_accepted
    assert e.stats.n_steps - steps < 26, "32 tokens of copied code take far fewer steps"
    # the rejected draft cells left the KV: the sequence ends before the last token
    seq = e.slots[h.slot_id].seq_id
    assert e.memory.seq_pos_max(seq) == len(h.prompt_tokens) + len(h.tokens) - 2
    drafts = e.stats.n_drafts
    hs = run_all(e, PROMPTS, greedy)
    for ref, got in zip(reference["three"], hs):
        assert_same(ref, got)
    assert e.stats.n_drafts > drafts


def test_stop_string_and_n_predict_on_accepted_tokens(reference, simple_engine):
    """A stop string inside an accepted draft ends the text there; n_predict is exact (the
    expected texts: the reference answer cut at the stop string, its first 13 tokens)."""
    ref = reference["one"]
    stop = "result = {}"
    assert stop in ref.text
    [h] = run_all(simple_engine, [COPY], greedy(stop=[stop]))
    assert h.finish_reason == FinishReason.STOP and h.text == ref.text[:ref.text.index(stop)]
    assert h.timings.draft_n_accepted > 0
    [hn] = run_all(simple_engine, [COPY], greedy(13))
    assert hn.n_generated == 13 and hn.tokens == ref.tokens[:13]


def test_stream_has_a_chunk_per_accepted_token(simple_engine):
    h = simple_engine.submit(COPY, greedy(24, n_probs=1))
    simple_engine.run_until_idle()
    chunks = [c for c in h if hasattr(c, "tokens")]
    assert h.timings.draft_n_accepted > 5
    assert all(len(c.tokens) == 1 for c in chunks) and len(chunks) == 24
    assert all(c.probs and len(c.probs) == 1 for c in chunks)


def test_grammar_constrained_output_is_exact(reference, simple_engine):
    [h] = run_all(simple_engine, [GRAMMAR_PROMPT], grammar_params)
    assert set(h.text) <= set("abcd ")
    assert h.text == reference["grammar"].text
    assert h.timings.draft_n_accepted > 0


def test_request_limits_and_sampling(simple_engine):
    """speculative.n_max = 0 in a request turns its drafts off; sampled output keeps going
    with drafts (a sampler at every verified row)."""
    e = simple_engine
    off = e.submit(COPY, greedy(20, speculative=RequestSpec(n_max=0)))
    hot = e.submit(COPY, RequestParams(n_predict=20, sampling=SamplingParams(temperature=0.3, seed=7)))
    e.run_until_idle()
    assert off.timings.draft_n == 0 and off.n_generated == 20
    assert hot.n_generated == 20 and hot.timings.draft_n > 0


def test_cancel_while_drafting(reference, simple_engine):
    """A request cancelled mid-way frees its slot for a waiting one; the others' outputs are
    unchanged."""
    e = simple_engine
    hs = [e.submit(p, greedy()) for p in PROMPTS]
    victim = e.submit(COPY, greedy(24))
    for _ in range(6):
        e.step()
    hs[1].cancel()
    e.run_until_idle()
    assert hs[1].finish_reason == FinishReason.CANCELLED
    assert victim.n_generated == 24
    assert_same(reference["three"][0], hs[0])
    assert_same(reference["three"][2], hs[2])


# -- draft-simple ---------------------------------------------------------------------------------

def test_draft_model_is_its_own_draft(model, reference):
    """The default model drafting for itself: nearly every draft token is kept."""
    spec = SpecParams(types=("draft-simple",), draft_model=str(model.path), n_max=4)
    with engine(model, n_parallel=1, spec=spec) as e:
        [h] = run_all(e, [COPY], greedy(20))
        assert_same(reference["one"], h)
        t = h.timings
        assert t.draft_n > 8 and t.draft_n_accepted >= 0.8 * t.draft_n
        assert e.stats.n_steps < 12


def test_random_draft_never_changes_output(model, reference):
    """A random draft model (three slots drafting in one batch) is nearly always wrong: the
    outputs stay the target's, and the adaptive length soon stops asking it."""
    spec = SpecParams(types=("draft-simple",), draft_model=str(tiny_model()), n_max=4)
    with engine(model, spec=spec) as e:
        hs = run_all(e, PROMPTS, greedy)
        for ref, got in zip(reference["three"], hs):
            assert_same(ref, got)
        t = [h.timings for h in hs]
        assert 0 < sum(x.draft_n for x in t) and sum(x.draft_n_accepted for x in t) <= sum(x.draft_n for x in t) // 4
        assert all(x.draft_n < N for x in t), "drafts that keep failing are turned down"
