"""Speculative decoding in the engine (speculative.py, spec_verify.py, ngram_draft.py): the
n-gram drafters, batched verification across slots, the output equal to the run without
drafts, stop rules and grammars on the accepted tokens, the rejected cells gone from the KV
cache, the draft length that adapts.

"Equal" allows for one thing: llama.cpp's CPU kernels round a decode of several rows of one
sequence (the draft's verification) a little differently from a decode of one row, so where
the two best tokens of the run without drafts are within TIE logprob of each other the runs
may part there. Everywhere else they must agree token for token.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import N_THREADS, ROOT
from llama_lib import Engine, EngineConfig, FinishReason, RequestParams, SamplingParams
from llama_lib.engine.ngram_draft import NgramMod, ngram_map_k, ngram_simple
from llama_lib.engine.spec_params import RequestSpec, SpecParams
from llama_lib.engine.speculative import SlotSpec

TIE = 0.05  # logprob gap under which the two best tokens count as a tie

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
SPEC = {t: SpecParams(types=(t,), ngram_size_n=3, ngram_k_size_n=3, mod_n_match=3, mod_n_min=1)
        for t in ("ngram-simple", "ngram-map-k", "ngram-mod")}


def engine(model, n_parallel=2, spec=None, **kw) -> Engine:
    return Engine(model, EngineConfig(n_parallel=n_parallel, n_ctx=2048, n_threads=N_THREADS,
                                      n_threads_batch=N_THREADS, speculative=spec, **kw))


def greedy(n: int, **kw) -> RequestParams:
    return RequestParams(n_predict=n, sampling=SamplingParams(temperature=0), **kw)


def run_all(e: Engine, prompts, params) -> list:
    hs = [e.submit(p, params()) for p in prompts]
    e.run_until_idle()
    return hs


def assert_same(ref, got) -> None:
    """got's tokens are ref's, or part from them only where ref's best two were a tie."""
    a, b = ref.tokens, got.tokens
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top = ref.probs[i].top
            gap = top[0][1] - top[1][1]
            assert gap < TIE, f"token {i}: {y} instead of {x} (gap {gap:.3f}, not a tie)"
            return
    assert len(a) == len(b) and ref.finish_reason == got.finish_reason


@pytest.fixture(scope="module")
def reference(model):
    """Greedy outputs without speculation, with the top two logprobs of every token."""
    out = {}
    for n_par in (1, 3):
        with engine(model, n_parallel=n_par) as e:
            out[n_par] = run_all(e, PROMPTS[:n_par] if n_par == 3 else [COPY],
                                 lambda: greedy(32, n_probs=2))
    return out


def test_ngram_drafters():
    h = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], np.int32)
    assert ngram_simple(h, 3, 4).tolist() == [7, 8, 1, 2]      # the most recent earlier "1 2 3"
    assert ngram_simple(h, 3, 4, min_hits=3).tolist() == []    # seen twice before, not three times
    assert ngram_simple(h, 4, 4).tolist() == []                # "3 1 2 3" never seen before
    h2 = np.array([1, 2, 7, 1, 2, 7, 1, 2, 8, 1, 2], np.int32)
    assert ngram_map_k(h2, 2, 2).tolist() == [7, 1]            # 7 followed "1 2" twice, 8 once
    assert ngram_simple(h2, 2, 2).tolist() == [8, 1]
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
    assert SlotSpec(hits=0, misses=0).acceptance == pytest.approx(0.75)


@pytest.mark.parametrize("kind", sorted(SPEC))
def test_greedy_same_with_each_spec_type(model, reference, kind):
    with engine(model, n_parallel=1, spec=SPEC[kind]) as e:
        [h] = run_all(e, [COPY], lambda: greedy(32))
        assert_same(reference[1][0], h)
        assert h.timings.draft_n > 0 and h.timings.draft_n_accepted > 0
        assert e.stats.n_draft_accepted == h.timings.draft_n_accepted
        assert e.stats.n_steps < 26, "32 tokens of copied code take far fewer steps"
        # the rejected draft cells left the KV: the sequence ends before the last token
        assert e.memory.seq_pos_max(1) == len(h.prompt_tokens) + len(h.tokens) - 2


@pytest.mark.parametrize("kvu", [False, True])
def test_three_slots_at_once(model, reference, kvu):
    with engine(model, n_parallel=3, spec=SPEC["ngram-simple"], kv_unified=kvu) as e:
        hs = run_all(e, PROMPTS, lambda: greedy(32))
        for ref, h in zip(reference[3], hs):
            assert_same(ref, h)
        assert e.stats.n_drafts > 0


def test_stop_string_and_n_predict_on_accepted_tokens(model):
    """A stop string inside a long accepted draft ends the text there; n_predict is exact."""
    stop = "line.strip()"
    with engine(model, n_parallel=1) as e:
        [ref] = run_all(e, [COPY], lambda: greedy(80, stop=[stop]))
        [ref_n] = run_all(e, [COPY], lambda: greedy(23))
    with engine(model, n_parallel=1, spec=SPEC["ngram-simple"]) as e:
        [h] = run_all(e, [COPY], lambda: greedy(80, stop=[stop]))
        [hn] = run_all(e, [COPY], lambda: greedy(23))
    assert ref.finish_reason == h.finish_reason == FinishReason.STOP
    assert h.text == ref.text and stop not in h.text
    assert hn.n_generated == 23 == ref_n.n_generated and hn.text == ref_n.text


def test_stream_has_a_chunk_per_accepted_token(model):
    with engine(model, n_parallel=1, spec=SPEC["ngram-simple"]) as e:
        h = e.submit(COPY, greedy(40, n_probs=1))
        e.run_until_idle()
        chunks = [c for c in h if hasattr(c, "tokens")]
        assert h.timings.draft_n_accepted > 5
        assert all(len(c.tokens) == 1 for c in chunks) and len(chunks) == 40
        assert all(c.probs and len(c.probs) == 1 for c in chunks)


def test_grammar_constrained_output_is_exact(model):
    grammar = 'root ::= ("ab" | "cd" | " ")+'
    prompt = "ab cd ab cd ab cd ab cd ab cd ab cd ab cd"
    outs = []
    for spec in (None, SPEC["ngram-simple"]):
        with engine(model, n_parallel=1, spec=spec) as e:
            [h] = run_all(e, [prompt], lambda: RequestParams(
                n_predict=30, sampling=SamplingParams(temperature=0, grammar=grammar)))
            outs.append(h)
    assert set(outs[1].text) <= set("abcd ")
    assert outs[1].text == outs[0].text
    assert outs[1].timings.draft_n_accepted > 0


def test_request_limits_and_sampling(model):
    """speculative.n_max = 0 in a request turns its drafts off; sampled output keeps going
    with drafts (a sampler at every verified row)."""
    with engine(model, n_parallel=2, spec=SPEC["ngram-simple"]) as e:
        off = e.submit(COPY, greedy(30, speculative=RequestSpec(n_max=0)))
        hot = e.submit(COPY, RequestParams(n_predict=30, sampling=SamplingParams(temperature=0.3, seed=7)))
        e.run_until_idle()
        assert off.timings.draft_n == 0 and off.n_generated == 30
        assert hot.n_generated == 30 and hot.timings.draft_n > 0


def test_cancel_while_drafting(model, reference):
    """A request cancelled mid-way frees its slot; the others' outputs are unchanged."""
    with engine(model, n_parallel=3, spec=SPEC["ngram-simple"]) as e:
        hs = [e.submit(p, greedy(32)) for p in PROMPTS]
        victim = e.submit(COPY, greedy(60))
        for _ in range(6):
            e.step()
        hs[1].cancel()
        e.run_until_idle()
        assert hs[1].finish_reason == FinishReason.CANCELLED
        assert victim.n_generated == 60
        assert_same(reference[3][0], hs[0])
        assert_same(reference[3][2], hs[2])


# -- draft-simple ---------------------------------------------------------------------------------

RANDOM_DRAFT = ROOT / ".llama" / "models" / "test-random-draft-gemma3.gguf"


def build_random_draft(src, dst, seed=0):
    """A one-layer gemma3 GGUF with random weights and the default model's tokenizer: a draft
    whose guesses are nearly always wrong (the reject path)."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "gemma3")
    f = r.fields
    get = lambda k: f[k].contents()
    w.add_context_length(32768); w.add_embedding_length(64); w.add_block_count(1)
    w.add_feed_forward_length(128); w.add_head_count(2); w.add_head_count_kv(1)
    w.add_key_length(32); w.add_value_length(32); w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0); w.add_sliding_window(512)
    w.add_tokenizer_model(get("tokenizer.ggml.model")); w.add_tokenizer_pre(get("tokenizer.ggml.pre"))
    w.add_token_list(get("tokenizer.ggml.tokens")); w.add_token_scores(get("tokenizer.ggml.scores"))
    w.add_token_types(get("tokenizer.ggml.token_type"))
    for k, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                  ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        fn(get("tokenizer.ggml." + k))
    w.add_add_bos_token(get("tokenizer.ggml.add_bos_token")); w.add_add_space_prefix(get("tokenizer.ggml.add_space_prefix")); w.add_add_sep_token(get("tokenizer.ggml.add_sep_token")); w.add_add_eos_token(get("tokenizer.ggml.add_eos_token"))
    rng = np.random.default_rng(seed)
    n_vocab = len(f["tokenizer.ggml.tokens"].data)
    def t(name, *shape, ones=False):
        a = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(name, a.astype(np.float16) if len(shape) > 1 else a)
    t("token_embd.weight", n_vocab, 64); t("output_norm.weight", 64, ones=True)
    p = "blk.0."
    t(p + "attn_norm.weight", 64, ones=True); t(p + "attn_q.weight", 64, 64); t(p + "attn_k.weight", 32, 64)
    t(p + "attn_v.weight", 32, 64); t(p + "attn_output.weight", 64, 64)
    t(p + "attn_q_norm.weight", 32, ones=True); t(p + "attn_k_norm.weight", 32, ones=True)
    t(p + "post_attention_norm.weight", 64, ones=True); t(p + "ffn_norm.weight", 64, ones=True)
    t(p + "ffn_gate.weight", 128, 64); t(p + "ffn_up.weight", 128, 64); t(p + "ffn_down.weight", 64, 128)
    t(p + "post_ffw_norm.weight", 64, ones=True)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module")
def random_draft(model):
    if not RANDOM_DRAFT.is_file():
        tmp = RANDOM_DRAFT.with_suffix(f".{os.getpid()}.tmp")
        build_random_draft(str(model.path), str(tmp))
        os.replace(tmp, RANDOM_DRAFT)
    return str(RANDOM_DRAFT)


def test_draft_model_is_its_own_draft(model, reference):
    """The default model drafting for itself: nearly every draft token is kept."""
    spec = SpecParams(types=("draft-simple",), draft_model=str(model.path), n_max=4)
    with engine(model, n_parallel=1, spec=spec) as e:
        [h] = run_all(e, [COPY], lambda: greedy(32))
        assert_same(reference[1][0], h)
        t = h.timings
        assert t.draft_n > 8 and t.draft_n_accepted >= 0.8 * t.draft_n
        assert e.stats.n_steps < 20


def test_random_draft_never_changes_output(model, reference, random_draft):
    """A random draft model is nearly always wrong: the output stays the target's, and the
    adaptive length soon stops asking it."""
    spec = SpecParams(types=("draft-simple",), draft_model=random_draft, n_max=4)
    with engine(model, n_parallel=1, spec=spec) as e:
        [h] = run_all(e, [COPY], lambda: greedy(32))
        assert_same(reference[1][0], h)
        t = h.timings
        assert 0 < t.draft_n and t.draft_n_accepted <= t.draft_n // 4
        assert t.draft_n < 32, "drafts that keep failing are turned down"
