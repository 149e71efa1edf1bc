"""The foundation under the engine: loader, defaults, Vocab, Batch, Context/Memory, Sampler.

Everything runs against the real libllama and the real default model (no mocks). Contexts are
small (n_ctx 1024) and generation short, so the whole file takes a few seconds on 2 cores.
"""

from __future__ import annotations

import codecs
import ctypes
import gc
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llama_lib
from llama_lib import _bindings as B
from llama_lib.batch import Batch
from llama_lib.context import Context, DecodeError
from llama_lib.loader import FETCH_DIR, lib
from llama_lib.sampler import Sampler, SamplingParams

from conftest import N_THREADS, ROOT

PROMPT_A = "User: What is the capital of France?\nAssistant:"
PROMPT_B = "User: Write a haiku about the sea.\nAssistant:"


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx(model):
    """Two sequences, separate KV streams (the default, kv_unified=False)."""
    c = Context(model, n_ctx=1024, n_batch=512, n_ubatch=512, n_seq_max=2,
                n_threads=N_THREADS, n_threads_batch=N_THREADS)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ctx_unified(model):
    """Two sequences sharing one KV buffer."""
    c = Context(model, n_ctx=1024, n_batch=512, n_ubatch=512, n_seq_max=2, kv_unified=True,
                n_threads=N_THREADS, n_threads_batch=N_THREADS)
    yield c
    c.close()


@pytest.fixture
def batch(library):
    b = Batch(512, 2)
    yield b
    b.close()


def greedy(ctx: Context, batch: Batch, tokens, seq: int, n: int, start_pos: int = 0,
           logits_out: list | None = None) -> list[int]:
    """Decode `tokens` into sequence `seq` from `start_pos`, then generate n tokens greedily.
    Each pick is checked against numpy's argmax of the logits row (the logits view is right).
    The logits after the prompt are appended to `logits_out` if given."""
    smp = Sampler(SamplingParams(temperature=0), ctx.n_vocab)
    try:
        batch.clear()
        last = batch.add_sequence(tokens, start_pos, seq)
        assert ctx.decode(batch.c_batch) == 0
        if logits_out is not None:
            logits_out.append(ctx.logits(last).copy())
        out, pos = [], start_pos + len(tokens)
        for _ in range(n):
            tok = smp.sample(ctx, last)
            assert tok == int(np.argmax(ctx.logits(last)))
            out.append(tok)
            batch.clear()
            last = batch.add(tok, pos, seq, logits=True)
            pos += 1
            assert ctx.decode(batch.c_batch) == 0
        return out
    finally:
        smp.close()


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (load_library is once per process)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


LOAD_AND_REPORT = """
    import llama_lib
    try:
        llama_lib.load_library()
    except llama_lib.LlamaLibraryError as e:
        print("LlamaLibraryError:", e)
    else:
        print("LOADED")
"""


# --- defaults ----------------------------------------------------------------------------------


def test_model_default_params(library):
    p = lib().llama_model_default_params()
    assert not p.devices
    assert not p.tensor_buft_overrides
    assert p.n_gpu_layers == -1
    assert p.split_mode == B.LLAMA_SPLIT_MODE_LAYER == 1
    assert p.load_mode == B.LLAMA_LOAD_MODE_AUTO == -1
    assert p.lazy_mode == B.LLAMA_LAZY_MODE_AUTO == 1
    assert p.main_gpu == 0
    assert not p.tensor_split
    assert not p.progress_callback
    assert not p.progress_callback_user_data
    assert not p.kv_overrides
    assert (p.vocab_only, p.check_tensors, p.use_extra_bufts, p.no_host, p.no_alloc, p.load_mtp) == (
        False, False, True, False, False, False)


def test_context_default_params(library):
    p = lib().llama_context_default_params()
    assert (p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max) == (512, 2048, 512, 1)
    assert (p.n_rs_seq, p.n_outputs_max, p.n_outputs_max_per_seq) == (0, 0, 1)
    assert (p.n_threads, p.n_threads_batch) == (4, 4)  # GGML_DEFAULT_N_THREADS
    assert p.ctx_type == 0  # LLAMA_CONTEXT_TYPE_DEFAULT
    assert p.rope_scaling_type == B.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED == -1
    assert p.pooling_type == B.LLAMA_POOLING_TYPE_UNSPECIFIED == -1
    assert p.attention_type == B.LLAMA_ATTENTION_TYPE_UNSPECIFIED == -1
    assert p.flash_attn_type == B.LLAMA_FLASH_ATTN_TYPE_AUTO == -1
    assert (p.rope_freq_base, p.rope_freq_scale) == (0.0, 0.0)
    assert (p.yarn_ext_factor, p.yarn_attn_factor, p.yarn_beta_fast, p.yarn_beta_slow) == (
        -1.0, -1.0, -1.0, -1.0)
    assert p.yarn_orig_ctx == 0
    assert p.defrag_thold == -1.0
    assert not p.cb_eval and not p.cb_eval_user_data
    assert p.type_k == p.type_v == B.GGML_TYPE_F16 == 1
    assert not p.abort_callback and not p.abort_callback_data
    assert (p.embeddings, p.offload_kqv, p.no_perf, p.op_offload, p.swa_full, p.kv_unified) == (
        False, True, True, True, True, False)
    assert not p.samplers and p.n_samplers == 0
    assert not p.ctx_other


def test_sampler_chain_default_params(library):
    assert lib().llama_sampler_chain_default_params().no_perf is True


def test_library_version_and_backend(library):
    assert library.version.startswith(B.HEADER_VERSION)
    assert library.ggml.ggml_backend_dev_count() >= 1  # the CPU backend plugin was loaded
    assert "CPU" in llama_lib.system_info()


def test_context_params_reach_c(model):
    """Values written into llama_context_params come back from libllama's getters, so the struct
    is passed by value with the right layout (kv_unified sits near its end)."""
    L = lib()
    with Context(model, n_ctx=1024, n_batch=256, n_ubatch=128, n_seq_max=2,
                 n_threads=N_THREADS, n_threads_batch=1) as c:
        assert (c.n_ctx, c.n_batch, c.n_ubatch, c.n_seq_max) == (1024, 256, 128, 2)
        assert c.n_ctx_seq == 512  # separate streams: the context is split between sequences
        assert (L.llama_n_threads(c.ptr), L.llama_n_threads_batch(c.ptr)) == (N_THREADS, 1)
        assert L.llama_get_model(c.ptr) == model.ptr
    with Context(model, n_ctx=1024, n_seq_max=2, kv_unified=True,
                 n_threads=N_THREADS, n_threads_batch=N_THREADS) as c:
        assert c.n_ctx_seq == 1024  # one shared stream


def test_model_properties(model):
    assert model.vocab.n_tokens == 262144
    assert (model.vocab.bos, model.vocab.eos) == (2, 1)
    assert model.n_ctx_train == 32768
    assert model.n_swa == 512
    assert model.n_layer > 0 and model.n_embd > 0
    assert model.size > 100_000_000
    assert "gemma3" in model.description
    assert model.meta("general.architecture") == "gemma3"
    assert model.meta("no.such.key") is None


# --- tokenizer ---------------------------------------------------------------------------------

TEXT = "héllo wörld — 日本語 🦙"


def test_tokenize_detokenize_round_trip(vocab):
    toks = vocab.tokenize(TEXT)
    assert toks.dtype == np.int32
    assert toks[0] == vocab.bos  # add_special adds BOS for this model
    assert vocab.bos not in vocab.tokenize(TEXT, add_special=False)
    assert vocab.detokenize(toks, remove_special=True) == TEXT
    assert vocab.detokenize(toks[1:]) == TEXT
    assert b"".join(vocab.pieces(toks[1:])) == TEXT.encode()
    assert np.array_equal(vocab.tokenize(TEXT.encode()), toks)  # bytes in, same tokens


def test_detokenize_grows_its_buffer(vocab):
    # 200 bytes in 13 tokens: more than the first guess of 8 bytes per token
    text = "=" * 200 + " and " + " " * 100 + "end"
    toks = vocab.tokenize(text, add_special=False)
    assert len(text) > 8 * len(toks)
    assert vocab.detokenize(toks) == text


def test_tokenize_special(vocab):
    with_special = vocab.tokenize("<start_of_turn>user", add_special=False, parse_special=True)
    as_text = vocab.tokenize("<start_of_turn>user", add_special=False, parse_special=False)
    assert len(with_special) < len(as_text)
    assert vocab.is_control(int(with_special[0]))
    assert vocab.is_eog(vocab.eos) and not vocab.is_eog(int(as_text[0]))


def test_token_range_errors(vocab):
    with pytest.raises(ValueError):
        vocab.token_to_piece(vocab.n_tokens)
    with pytest.raises(ValueError):
        vocab.detokenize([1, -1])


def test_streaming_pieces_through_incremental_utf8(vocab):
    """A byte-fallback character is split over several tokens whose pieces are not valid UTF-8
    alone; an incremental decoder fed piece by piece still yields exactly the original text."""
    candidates = ["🦙", "🫎", "𓀀", "龘", "ꙮ", "🪿"]
    for ch in candidates:
        text = f"Llamas {ch} and more {ch}!"
        pieces = vocab.pieces(vocab.tokenize(text, add_special=False))
        broken = []
        for p in pieces:
            try:
                p.decode("utf-8")
            except UnicodeDecodeError:
                broken.append(p)
        if broken:
            break
    else:
        pytest.fail(f"no candidate among {candidates} is split into non-UTF-8 pieces")

    dec = codecs.getincrementaldecoder("utf-8")()
    streamed = [dec.decode(p) for p in pieces] + [dec.decode(b"", final=True)]
    assert "".join(streamed) == text
    assert not any("\ufffd" in s for s in streamed)
    # decoding each piece alone would have garbled it
    assert "".join(p.decode("utf-8", "replace") for p in pieces) != text
    with pytest.raises(UnicodeDecodeError):
        broken[0].decode("utf-8")


# --- Batch -------------------------------------------------------------------------------------


def _addr(ptr) -> int:
    return ctypes.cast(ptr, ctypes.c_void_p).value


def test_batch_numpy_views_share_memory_with_c(library):
    with Batch(64, 3) as b:
        c = b._c
        for name in ("token", "pos", "n_seq_id"):
            arr, cptr = getattr(b, name), getattr(c, name)
            arr[3] = 42
            assert cptr[3] == 42, name
            cptr[5] = -7
            assert arr[5] == -7, name
        b.logits[3] = 1
        assert c.logits[3] == 1
        c.logits[4] = 1
        assert b.logits[4] == 1
        # seq_id rows: the C pointer table points at the rows of the numpy table
        b.seq_id[3, 0] = 11
        b.seq_id[3, 2] = 13
        assert (c.seq_id[3][0], c.seq_id[3][2]) == (11, 13)
        c.seq_id[7][1] = 99
        assert b.seq_id[7, 1] == 99
        assert _addr(c.seq_id[1]) - _addr(c.seq_id[0]) == 3 * 4
        assert not c.seq_id[64]  # llama_batch_free stops at the NULL after the last entry
        assert not c.embd


def test_batch_add_sequence_2000_tokens(library):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 262144, size=2000, dtype=np.int32)
    with Batch(2048, 4) as b:
        b.add(5, 0, [0, 1, 2])
        last = b.add_sequence(toks, start_pos=17, seq_id=3)
        assert last == 2000 and b.n_tokens == len(b) == 2001
        s = slice(1, 2001)
        assert np.array_equal(b.token[s], toks)
        assert np.array_equal(b.pos[s], np.arange(17, 2017))
        assert (b.n_seq_id[s] == 1).all() and (b.seq_id[s, 0] == 3).all()
        assert b.logits[2000] == 1 and not b.logits[1:2000].any()
        # the C side sees the same
        assert (b._c.token[1000], b._c.pos[1000], b._c.seq_id[1000][0]) == (toks[999], 1016, 3)
        assert b._c.logits[2000] == 1 and b._c.logits[1999] == 0
        # the first token was left alone
        assert (b.token[0], b.n_seq_id[0], list(b.seq_id[0, :3])) == (5, 3, [0, 1, 2])
        # logits_last=False flags nothing
        b.clear()
        b.add_sequence(toks[:10], 0, 0, logits_last=False)
        assert not b.logits[:10].any()


def test_batch_view_copies_nothing(library):
    with Batch(256, 2) as b:
        b.add_sequence(np.arange(100, 300, dtype=np.int32), 0, 1)
        start, n = 37, 50
        v = b.view(start, n)
        assert v.n_tokens == n
        assert _addr(v.token) == b.token.ctypes.data + 4 * start
        assert _addr(v.pos) == b.pos.ctypes.data + 4 * start
        assert _addr(v.n_seq_id) == b.n_seq_id.ctypes.data + 4 * start
        assert _addr(v.logits) == b.logits.ctypes.data + start
        assert _addr(v.seq_id) == _addr(b._c.seq_id) + 8 * start
        assert not v.embd
        assert (v.token[0], v.pos[0], v.seq_id[0][0]) == (100 + start, start, 1)
        b.token[start] = 7  # a later write shows through the view
        assert v.token[0] == 7
        assert _addr(b.c_batch.token) == b.token.ctypes.data and b.c_batch.n_tokens == 200
        with pytest.raises(IndexError):
            b.view(150, 51)
        with pytest.raises(IndexError):
            b.view(-1, 2)


def test_batch_add_clear_and_errors(library):
    with Batch(4, 2) as b:
        assert b.add(10, 0, 0) == 0
        assert b.add(11, 1, [0, 1], logits=True) == 1
        assert (b.n_seq_id[1], list(b.seq_id[1])) == (2, [0, 1])
        assert list(b.logits[:2]) == [0, 1]
        with pytest.raises(ValueError):
            b.add(12, 2, [0, 1, 2])  # more sequences than n_seq_max
        with pytest.raises(ValueError):
            b.add(12, 2, [])
        assert len(b) == 2  # failed adds wrote nothing
        b.add(12, 2, 1)
        b.add(13, 3, 1)
        with pytest.raises(OverflowError):
            b.add(14, 4, 1)
        b.clear()
        assert len(b) == 0 and b.c_batch.n_tokens == 0
        with pytest.raises(OverflowError):
            b.add_sequence([1, 2, 3, 4, 5], 0, 0)
        with pytest.raises(ValueError):
            b.add_sequence([], 0, 0)
        assert b.add_tokens(np.array([7, 8], np.int32), np.array([3, 9], np.int32),
                            np.array([0, 1], np.int32)) == 0
        assert list(b.pos[:2]) == [3, 9] and list(b.seq_id[:2, 0]) == [0, 1]
        assert list(b.logits[:2]) == [1, 1]
        with pytest.raises(OverflowError):
            b.add_tokens(np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32),
                         np.zeros(3, np.int32))
    with pytest.raises(ValueError):
        Batch(0)


# --- decode, sampling and the KV cache ---------------------------------------------------------


def test_greedy_decode_is_deterministic_and_sensible(ctx, batch, vocab):
    ctx.memory.clear()
    prompt = vocab.tokenize(PROMPT_A)
    first = greedy(ctx, batch, prompt, seq=0, n=16)
    second = greedy(ctx, batch, prompt, seq=1, n=16)  # a fresh sequence, same prompt
    assert first == second
    assert "Paris" in vocab.detokenize(first)  # the bindings deliver the model's real output
    ctx.memory.clear()
    assert greedy(ctx, batch, prompt, seq=0, n=16) == first  # and again after clearing


@pytest.mark.parametrize("which", ["ctx", "ctx_unified"])
def test_two_sequences_in_one_batch_match_each_alone(request, which, batch, vocab):
    c: Context = request.getfixturevalue(which)
    prompts = [vocab.tokenize(PROMPT_A), vocab.tokenize(PROMPT_B)]
    n = 12
    c.memory.clear()
    alone = []
    for p in prompts:
        alone.append(greedy(c, batch, p, seq=0, n=n))
        c.memory.clear()

    smp = [Sampler(SamplingParams(temperature=0), c.n_vocab) for _ in prompts]
    batch.clear()
    rows = [batch.add_sequence(p, 0, s) for s, p in enumerate(prompts)]
    assert c.decode(batch.c_batch) == 0
    together = [[] for _ in prompts]
    pos = [len(p) for p in prompts]
    for _ in range(n):
        toks = [smp[s].sample(c, rows[s]) for s in range(len(prompts))]
        batch.clear()
        rows = []
        for s, t in enumerate(toks):
            together[s].append(t)
            rows.append(batch.add(t, pos[s], s, logits=True))
            pos[s] += 1
        assert c.decode(batch.c_batch) == 0
    for s in smp:
        s.close()
    assert together == alone
    assert together[0] != together[1]
    assert (c.memory.seq_pos_max(0), c.memory.seq_pos_max(1)) == (pos[0] - 1, pos[1] - 1)
    c.memory.clear()


@pytest.mark.parametrize("which", ["ctx", "ctx_unified"])  # buffer copy / shared cells
def test_seq_cp_shares_a_decoded_prefix(request, which, batch, vocab):
    c: Context = request.getfixturevalue(which)
    prefix = vocab.tokenize("User: Tell me about llamas.\nAssistant: Llamas are")
    suffix = vocab.tokenize(" animals that live in", add_special=False)
    n = 8

    def decode_prefix(seq):
        batch.clear()
        batch.add_sequence(prefix, 0, seq)
        assert c.decode(batch.c_batch) == 0

    # reference: prefix then suffix decoded in one sequence, in the same two batches
    # (logits depend slightly on how tokens are grouped into batches, see test_seq_rm...)
    c.memory.clear()
    decode_prefix(0)
    want_logits = []
    want = greedy(c, batch, suffix, seq=0, n=n, start_pos=len(prefix), logits_out=want_logits)
    c.memory.clear()

    decode_prefix(0)
    c.memory.seq_cp(0, 1)
    assert (c.memory.seq_pos_min(1), c.memory.seq_pos_max(1)) == (0, len(prefix) - 1)
    got_logits = []
    got = greedy(c, batch, suffix, seq=1, n=n, start_pos=len(prefix), logits_out=got_logits)
    assert got == want
    np.testing.assert_allclose(got_logits[0], want_logits[0], atol=1e-4)
    assert c.memory.seq_pos_max(0) == len(prefix) - 1  # the source is untouched

    # control: without the copied prefix the same suffix continues differently
    c.memory.clear()
    assert greedy(c, batch, suffix, seq=1, n=n, start_pos=len(prefix)) != want
    c.memory.clear()


def test_seq_rm_and_positions(ctx, batch, vocab):
    c = ctx
    c.memory.clear()
    assert c.memory.seq_pos_max(0) == -1 and c.memory.seq_pos_min(0) == -1
    toks = vocab.tokenize("User: Count from one to ten.\nAssistant: one, two, three, four")
    keep = 10

    def decode(t, pos0):
        batch.clear()
        last = batch.add_sequence(t, pos0, 0)
        assert c.decode(batch.c_batch) == 0
        return c.logits(last).copy()

    decode(toks, 0)
    assert (c.memory.seq_pos_min(0), c.memory.seq_pos_max(0)) == (0, len(toks) - 1)
    # positions already held cannot be decoded again...
    batch.clear()
    batch.add_sequence(toks[keep:], keep, 0)
    with pytest.raises(DecodeError):
        c.decode(batch.c_batch)
    # ...until they are removed
    assert c.memory.seq_rm(0, keep, -1)
    assert (c.memory.seq_pos_min(0), c.memory.seq_pos_max(0)) == (0, keep - 1)
    first = decode(toks[keep:], keep)
    assert c.memory.seq_pos_max(0) == len(toks) - 1
    assert c.memory.seq_rm(0, keep, -1)
    assert np.array_equal(decode(toks[keep:], keep), first)  # rolled back to the same state

    # The same logits as decoding the two parts into a fresh sequence, up to the small differences
    # that come from the first `keep` tokens having been computed in a batch of a different size
    # (libllama's repacked CPU weights make logits depend on batch shape by up to ~0.6).
    c.memory.clear()
    decode(toks[:keep], 0)
    fresh = decode(toks[keep:], keep)
    assert np.argmax(fresh) == np.argmax(first)
    assert np.corrcoef(fresh, first)[0, 1] > 0.999

    assert c.memory.seq_rm(0, -1, -1)
    assert c.memory.seq_pos_max(0) == -1
    c.memory.clear()


def test_decode_errors(ctx, batch, vocab):
    ctx.memory.clear()
    batch.clear()
    batch.add(ctx.n_vocab + 5, 0, 0, logits=True)  # not a token of this model
    with pytest.raises(DecodeError) as ei:
        ctx.decode(batch.c_batch)
    assert ei.value.code < 0
    with Batch(ctx.n_batch + 1) as big:  # more tokens than n_batch: llama_decode would abort()
        big.add_sequence(np.full(ctx.n_batch + 1, 100, np.int32), 0, 0)
        with pytest.raises(ValueError, match="n_batch"):
            ctx.decode(big.c_batch)
        assert ctx.decode(big.view(0, ctx.n_batch)) == 0  # a chunk of n_batch is fine
    with pytest.raises(IndexError):
        ctx.logits(5)  # only the last token of the chunk had its logits computed
    ctx.memory.clear()


def test_sampler_chain(ctx, batch, vocab):
    """Samplers build (including the penalties sampler) and seeded sampling is reproducible."""
    L = lib()
    with Sampler(SamplingParams(temperature=0, repeat_penalty=1.3), ctx.n_vocab) as s:
        # llama.cpp's whole chain (common_sampler_init): its nine samplers in order, then dist
        names = [L.llama_sampler_name(L.llama_sampler_chain_get(s.ptr, i)).decode()
                 for i in range(L.llama_sampler_chain_n(s.ptr))]
        assert names[0] == "penalties" and names[-2:] == ["temp-ext", "dist"] and len(names) == 10
    with Sampler(SamplingParams(logit_bias={42: 100.0}, temperature=0), ctx.n_vocab) as s:
        ctx.memory.clear()
        batch.clear()
        batch.add_sequence(vocab.tokenize(PROMPT_A), 0, 0)
        ctx.decode(batch.c_batch)
        assert s.sample(ctx, batch.n_tokens - 1) == 42  # the bias decides

    def draw(seed):
        with Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                     ctx.n_vocab) as s:
            assert s.seed == seed
            return [s.sample(ctx, batch.n_tokens - 1) for _ in range(8)]

    assert draw(1234) == draw(1234)
    assert len({tuple(draw(seed)) for seed in (1, 2, 3)}) > 1
    ctx.memory.clear()


def test_plain_greedy_takes_the_argmax_shortcut(ctx, batch, vocab):
    """Plain greedy skips the chain (numpy argmax) and picks what llama.cpp's greedy sampler
    picks, row after row; greedy with a bias or a penalty still runs the chain."""
    ctx.memory.clear()
    batch.clear()
    toks = vocab.tokenize(PROMPT_A + " The capital of Italy is Rome, and the capital of Spain is")
    batch.add_sequence(toks, 0, 0)
    batch.logits[:] = 1  # an output row for every token: many different distributions
    assert ctx.decode(batch.c_batch) == 0
    with Sampler(SamplingParams(temperature=0), ctx.n_vocab) as fast, \
         Sampler(SamplingParams(temperature=0), ctx.n_vocab) as chain:
        assert fast._argmax
        chain._argmax = False  # the llama.cpp chain (greedy sampler) on the same rows
        for i in range(len(toks)):
            assert fast.sample(ctx, i) == chain.sample(ctx, i)
    # with biases: a ban (-inf) of each row's top token and a boost, as the chain applies them
    # (the biased argmax never copies the row, and must leave the context's logits as they were)
    for i in range(len(toks)):
        top = int(np.argmax(ctx.logits(i)))
        before = ctx.logits(i).copy()
        second = int(np.argsort(before)[-2])
        tie = float(before[top] - before[second])  # lifts the runner-up to exactly the top's logit
        for bias in ({top: -math.inf, 1000 + i: 5.0}, {1000 + i: 100.0}, {top: 0.0},
                     {second: tie}, {top: -math.inf, second: -math.inf}):
            with Sampler(SamplingParams(temperature=0, logit_bias=bias), ctx.n_vocab) as fast, \
                 Sampler(SamplingParams(temperature=0, logit_bias=bias), ctx.n_vocab) as chain:
                assert fast._argmax
                chain._argmax = False
                got = fast.sample(ctx, i)
                assert np.array_equal(ctx.logits(i), before)
                if bias == {second: tie}:  # an exact tie: the lowest id (the chain's top_k
                    assert got == min(top, second)  # sort leaves equal logits in no set order)
                    continue
                assert got == chain.sample(ctx, i), (i, bias)
                if bias.get(top) == -math.inf:
                    assert got != top
    for p in (SamplingParams(temperature=0, repeat_penalty=1.1), SamplingParams(temperature=0.5),
              SamplingParams(temperature=0, grammar='root ::= "a"')):
        with Sampler(p, ctx.n_vocab, vocab) as s:
            assert not s._argmax
    ctx.memory.clear()


def test_top_k_sampling_over_candidates_draws_as_the_whole_row(ctx, batch, vocab):
    """A chain that starts with top_k runs over topk.top_superset's candidates (plus the
    biased tokens): for a fixed seed it draws the same tokens as llama_sampler_sample over
    all 262k logits, row after row, with and without biases that ban or lift tokens."""
    ctx.memory.clear()
    batch.clear()
    toks = vocab.tokenize(PROMPT_A + " The capital of Italy is Rome, and the capital of Spain is")
    batch.add_sequence(toks, 0, 0)
    batch.logits[:] = 1
    assert ctx.decode(batch.c_batch) == 0
    top = [int(np.argmax(ctx.logits(i))) for i in range(len(toks))]
    cases = [SamplingParams(seed=7), SamplingParams(seed=8, temperature=2.0, top_k=1000, top_p=1.0, min_p=0.0),
             SamplingParams(seed=9, top_k=3, logit_bias={top[0]: -math.inf, top[1]: -math.inf, 1000: 40.0}),
             SamplingParams(seed=10, top_k=40, top_p=0.9, typical_p=0.8, logit_bias={1: -math.inf, 106: -math.inf})]
    for p in cases:
        with Sampler(p, ctx.n_vocab, vocab) as cut, Sampler(p, ctx.n_vocab, vocab) as whole:
            assert cut._cut_k == p.top_k
            whole._cut_k = 0  # llama_sampler_sample over the whole row
            got = [cut.sample(ctx, r % len(toks)) for r in range(120)]
            assert got == [whole.sample(ctx, r % len(toks)) for r in range(120)], p
            if 1000 in p.logit_bias:  # lifted from far below the top k: always drawn
                assert set(got) == {1000}
            else:
                assert len(set(got)) > 3, "the draws must differ (the seeded RNG is used)"
    for p in (SamplingParams(top_k=0), SamplingParams(top_k=40, repeat_penalty=1.1), SamplingParams(temperature=0),
              SamplingParams(top_k=40, grammar='root ::= "a"')):
        with Sampler(p, ctx.n_vocab, vocab) as s:
            assert not s._cut_k
    ctx.memory.clear()


# --- loading errors ----------------------------------------------------------------------------


def test_wrong_library_version_is_refused():
    r = run_python(textwrap.dedent("""
        import llama_lib._bindings as B
        B.HEADER_VERSION = "9.9.9"
    """) + textwrap.dedent(LOAD_AND_REPORT))
    assert r.returncode == 0, r.stderr
    msg = r.stdout
    assert "LlamaLibraryError:" in msg
    assert "'0.5.0" in msg  # what was found
    assert "'9.9.9'" in msg  # what the bindings want
    assert "fetch_llama.sh" in msg  # how to fix it


def test_missing_library_folder():
    r = run_python(LOAD_AND_REPORT, LLAMA_LIB_DIR="/nonexistent/llama-lib")
    assert "LlamaLibraryError:" in r.stdout, r.stdout + r.stderr
    assert "/nonexistent/llama-lib" in r.stdout and "fetch_llama.sh" in r.stdout


def test_empty_library_folder(tmp_path):
    r = run_python(LOAD_AND_REPORT, LLAMA_LIB_DIR=str(tmp_path))
    assert "LlamaLibraryError:" in r.stdout, r.stdout + r.stderr
    assert str(tmp_path) in r.stdout and "libllama" in r.stdout and "fetch_llama.sh" in r.stdout


def test_garbage_library_files(tmp_path):
    for name in ("libggml-base.so", "libggml.so", "libllama.so"):
        (tmp_path / name).write_bytes(b"\x7fELF this is not a shared object" + os.urandom(512))
    r = run_python(LOAD_AND_REPORT, LLAMA_LIB_DIR=str(tmp_path))
    assert "LlamaLibraryError:" in r.stdout, r.stdout + r.stderr
    assert str(tmp_path) in r.stdout and "fetch_llama.sh" in r.stdout


def test_a_real_library_that_is_not_libllama(tmp_path):
    src = FETCH_DIR / "lib"
    (tmp_path / "libggml-base.so").write_bytes((src / "libggml-base.so").read_bytes())
    (tmp_path / "libggml.so").write_bytes((src / "libggml.v0.5.0.so").read_bytes())
    (tmp_path / "libllama.so").write_bytes((src / "libggml-base.so").read_bytes())
    r = run_python(LOAD_AND_REPORT, LLAMA_LIB_DIR=str(tmp_path))
    assert "LlamaLibraryError:" in r.stdout, r.stdout + r.stderr
    assert "is not libllama" in r.stdout and str(tmp_path) in r.stdout


def test_library_loads_once_per_process(library, tmp_path):
    assert llama_lib.load_library() is library
    with pytest.raises(llama_lib.LlamaLibraryError, match="already loaded"):
        llama_lib.load_library(tmp_path)


def test_missing_model_file(library):
    with pytest.raises(llama_lib.ModelLoadError, match="/nonexistent.gguf"):
        llama_lib.Model("/nonexistent.gguf")


def test_garbage_model_file(library, tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(llama_lib.ModelLoadError, match="garbage.gguf"):
        llama_lib.Model(bad)
    truncated = tmp_path / "truncated.gguf"  # a download cut short
    with open(llama_lib.default_model_path(), "rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    with pytest.raises(llama_lib.ModelLoadError, match="truncated.gguf"):
        llama_lib.Model(truncated)


# --- lifetimes ---------------------------------------------------------------------------------


class _Counting:
    """Wraps a real libllama free function and counts the calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_objects_free_exactly_once(model):
    m = llama_lib.Model(vocab_only=True)
    c = Context(model, n_ctx=512, n_threads=N_THREADS, n_threads_batch=N_THREADS)
    b = Batch(8)
    s = Sampler(SamplingParams(), model.vocab.n_tokens)
    counters = {}
    for obj, attr in ((m, "_free"), (c, "_free"), (b, "_free_fn"), (s, "_free")):
        counters[type(obj).__name__] = cnt = _Counting(getattr(obj, attr))
        setattr(obj, attr, cnt)
    for obj in (c, b, s, m):
        obj.close()
        obj.close()
    del c, b, s, m
    gc.collect()  # __del__ after close frees nothing more
    assert {k: v.calls for k, v in counters.items()} == {"Model": 1, "Context": 1, "Batch": 1,
                                                         "Sampler": 1}


def test_context_managers_close(model):
    with Context(model, n_ctx=512, n_threads=N_THREADS, n_threads_batch=N_THREADS) as c:
        assert c.ptr
    assert c.ptr is None
    with Batch(4) as b:
        assert b._c is not None
    assert b._c is None
    with Sampler(SamplingParams(temperature=0), model.vocab.n_tokens) as s:
        assert s.ptr
    assert s.ptr is None
    with llama_lib.Model(vocab_only=True) as m:
        assert m.ptr and m.vocab.n_tokens == 262144
    assert m.ptr is None


# --- the persistent ggml thread pool -----------------------------------------------------------


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def test_context_attaches_a_persistent_thread_pool(model, vocab):
    """Each context owns a ggml thread pool whose workers live as long as it does: decoding
    starts no threads of its own, and close() joins the workers (the pool is freed once)."""
    before = _thread_count()
    c = Context(model, n_ctx=512, n_threads=3, n_threads_batch=3, threadpool=True)
    try:
        assert len(c._threadpools) == 1
        assert _thread_count() == before + 2  # two workers beside the calling thread
        b = Batch(64)
        b.add_sequence(vocab.tokenize(PROMPT_A), 0, 0)
        assert c.decode(b.c_batch) == 0
        assert _thread_count() == before + 2  # the same workers did the work
        b.close()
        counting = _Counting(c._free_threadpool)
        c._free_threadpool = counting
    finally:
        c.close()
        c.close()
    assert counting.calls == 1
    assert _thread_count() == before


def test_separate_batch_thread_pool(model):
    """-t and -tb differ: one pool each, as llama.cpp's common_init attaches them."""
    before = _thread_count()
    with Context(model, n_ctx=512, n_threads=1, n_threads_batch=3, threadpool=True) as c:
        assert len(c._threadpools) == 2
        assert _thread_count() == before + 2  # the batch pool's two workers; none for -t 1
    assert _thread_count() == before


def test_thread_pool_gives_the_same_logits(model, vocab):
    """The pool changes who computes, not what: logits match a context without one."""
    rows = []
    for threadpool in (True, False):
        with Context(model, n_ctx=512, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                     threadpool=threadpool) as c, Batch(64) as b:
            assert bool(c._threadpools) == threadpool
            b.add_sequence(vocab.tokenize(PROMPT_A), 0, 0)
            assert c.decode(b.c_batch) == 0
            rows.append(c.logits(-1).copy())
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-5)


def test_thread_pool_by_default_exactly_without_openmp(model):
    """The default attaches a pool only to a library built without OpenMP: there ggml would
    start its threads in every decode; with OpenMP the pool only slows it down."""
    info = llama_lib.build_info()
    assert info.openmp == ("OPENMP = 1" in llama_lib.system_info())
    assert info.cpu_backend.startswith("libggml-cpu") or info.cpu_backend == "built into libggml"
    with Context(model, n_ctx=512) as c:
        assert c.threadpool_attached == (not info.openmp)
    with Context(model, n_ctx=512, threadpool=False) as c:
        assert not c.threadpool_attached


@pytest.mark.parametrize("bad", [{"poll": 101}, {"poll": -1}, {"prio": 4}, {"prio": -2}])
def test_thread_pool_settings_are_checked(model, bad):
    with pytest.raises(ValueError, match="poll|prio"):
        Context(model, n_ctx=512, **bad)
