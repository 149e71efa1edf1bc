"""The batching engine on the real model: scheduling, system prompt, stops, cancel, KV limits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import N_THREADS, ROOT
from llama_lib import Engine, EngineConfig, FinishReason, PromptTooLong, RequestParams, SamplingParams

SYSTEM = ("A conversation between a User and a helpful Assistant.\n\n"
          "User:\nWhat is the capital of France?\nAssistant:\nThe capital of France is Paris.\n")
GREEDY = SamplingParams(temperature=0)


def question(q: str) -> str:
    return f"User:\n{q}\nAssistant:\n"


def make_engine(model, **kw) -> Engine:
    cfg = dict(n_parallel=2, n_ctx=2048, n_threads=N_THREADS, n_threads_batch=N_THREADS)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def greedy(n: int, **kw) -> RequestParams:
    return RequestParams(n_predict=n, sampling=SamplingParams(temperature=0), **kw)


def step_until(engine: Engine, cond, limit: int = 500) -> None:
    for _ in range(limit):
        if cond():
            return
        engine.step()
    raise AssertionError("condition not reached")


def test_continuous_batching_admits_while_others_generate(model):
    with make_engine(model, cont_batching=True) as e:
        a = e.submit(question("Tell me a long story about a dragon."), greedy(40, ignore_eos=True))
        step_until(e, lambda: a.n_generated >= 3)
        b = e.submit(question("Name a color."), greedy(5, ignore_eos=True))
        e.step()
        assert b.slot_id >= 0 and b.slot_id != a.slot_id
        assert not a.done, "b must start while a is still generating"
        e.run_until_idle()
        assert b.timings.started < a.timings.done
        assert a.finish_reason == FinishReason.LENGTH and a.n_generated == 40
        assert b.finish_reason == FinishReason.LENGTH and b.n_generated == 5


def test_without_continuous_batching_new_requests_wait(model):
    with make_engine(model, cont_batching=False) as e:
        a = e.submit(question("Tell me a story."), greedy(12, ignore_eos=True))
        step_until(e, lambda: a.n_generated >= 2)
        b = e.submit(question("Name a color."), greedy(4, ignore_eos=True))
        for _ in range(5):
            e.step()
            assert b.slot_id == -1, "b must wait while a generates"
        e.run_until_idle()
        assert b.done and a.done
        assert b.timings.started >= a.timings.done


def test_shared_system_prompt_decoded_once_same_output(model, vocab):
    qs = ["Who painted the Mona Lisa?", "What is two plus two?", "Name a big river."]
    n_sys = len(vocab.tokenize(SYSTEM, add_special=True))
    outs = {}
    for shared in (True, False):
        # prefix sharing off: it would share an unshared system prompt's tokens as well
        with make_engine(model, n_parallel=3, system_prompt=SYSTEM, share_system_prompt=shared,
                         prefix_share=False) as e:
            handles = [e.submit(question(q), greedy(16)) for q in qs]
            e.run_until_idle()
            n_req_tokens = sum(h.n_prompt_tokens for h in handles)
            if shared:
                # the system prompt went through llama_decode once, each request only its own part
                assert e.stats.n_prompt_tokens == n_sys + n_req_tokens
                assert all(h.n_cached_tokens == n_sys for h in handles)
            else:
                assert e.stats.n_prompt_tokens == n_req_tokens
                assert all(h.n_prompt_tokens > n_sys for h in handles)
            outs[shared] = [h.text for h in handles]
    assert outs[True] == outs[False]
    assert all(outs[True])


def _unstopped(model, prompt: str, n: int):
    with make_engine(model, n_parallel=1) as e:
        h = e.submit(prompt, greedy(n, ignore_eos=True))
        e.run_until_idle()
        return h.text, list(h.tokens)


def test_stop_string_across_tokens_is_caught_and_never_streamed(model, vocab):
    prompt = question("Describe the ocean in a few sentences.")
    full, tokens = _unstopped(model, prompt, 40)
    pieces = [vocab.token_to_piece(t).decode("utf-8", "replace") for t in tokens]
    # a stop string made of the end of one token's text and the start of the next one's
    stop = None
    for k in range(3, len(pieces) - 1):
        end_k = sum(len(p) for p in pieces[: k + 1])
        cand = pieces[k][-2:] + pieces[k + 1][:2]
        if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2 and full.find(cand) == end_k - 2:
            stop = cand
            break
    assert stop is not None, f"no suitable token boundary in {pieces}"
    cut = full.find(stop)
    with make_engine(model, n_parallel=1) as e:
        h = e.submit(prompt, greedy(40, ignore_eos=True, stop=[stop]))
        e.start()
        streamed = [c.text for c in h]
    assert h.finish_reason == FinishReason.STOP and h.stopping_word == stop
    assert "".join(streamed) == full[:cut] == h.text
    assert stop not in "".join(streamed)


def test_holdback_releases_text_that_is_not_a_stop(model, vocab):
    prompt = question("Describe the ocean in a few sentences.")
    full, tokens = _unstopped(model, prompt, 30)
    pieces = [vocab.token_to_piece(t).decode("utf-8", "replace") for t in tokens]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i].strip()) >= 3)
    fake = pieces[k] + "\x00never"  # starts like token k's text, never completes
    with make_engine(model, n_parallel=1) as e:
        h = e.submit(prompt, greedy(30, ignore_eos=True, stop=[fake]))
        e.start()
        chunks = list(h)
    assert h.finish_reason == FinishReason.LENGTH
    assert "".join(c.text for c in chunks) == full
    # token k's text was held back (its chunk carried less than its piece) and released later
    held = [c for c in chunks if c.tokens == [tokens[k]]]
    assert held and held[0].text != pieces[k]


def test_cancel_frees_slot_and_kv(model, vocab):
    n_sys = len(vocab.tokenize(SYSTEM, add_special=True))
    with make_engine(model, n_parallel=1, system_prompt=SYSTEM) as e:
        a = e.submit(question("Tell me a long story."), greedy(200, ignore_eos=True))
        step_until(e, lambda: a.n_generated >= 5)
        slot_seq = e.slots[a.slot_id].seq_id
        assert e.seq_pos_max(slot_seq) > n_sys
        b = e.submit(question("Name a color."), greedy(4, ignore_eos=True))
        a.cancel()
        e.step()
        assert a.done and a.finish_reason == FinishReason.CANCELLED
        assert b.slot_id == a.slot_id, "the freed slot goes to the next request"
        # a's cells were freed, not kept as a prompt cache: b (also starting "User:\n") found
        # only the system prompt in the slot
        assert b.n_cached_tokens == n_sys
        e.run_until_idle()
        assert b.finish_reason == FinishReason.LENGTH
        # the slot now holds the system prompt plus b's prompt and its decoded tokens (the
        # prompt cache of a finished request), nothing of a
        assert e.seq_pos_max(slot_seq) == n_sys + b.n_prompt_tokens + b.n_generated - 2
        assert e.stats.n_requests_cancelled == 1


def test_kv_exhaustion_fails_one_request_not_the_others(model):
    # A unified cache of 512 cells shared by two slots that each want ~450 positions.
    with make_engine(model, n_parallel=2, n_ctx=512, kv_unified=True, n_batch=512) as e:
        long_prompt = question("Write about the history of mathematics. " * 8)
        a = e.submit(long_prompt, greedy(400, ignore_eos=True))
        b = e.submit(long_prompt, greedy(400, ignore_eos=True))
        e.run_until_idle()
        reasons = sorted([a.finish_reason.value, b.finish_reason.value])
        assert reasons == ["error", "length"], reasons
        failed = a if a.finish_reason == FinishReason.ERROR else b
        assert "KV cache is full" in failed.error
        assert e.stats.n_cache_misses >= 1
        # the engine recovers: a new request runs to completion
        c = e.submit(question("Name a fruit."), greedy(8, ignore_eos=True))
        e.run_until_idle()
        assert c.finish_reason == FinishReason.LENGTH and c.n_generated == 8


def test_prompt_too_long_is_refused(model):
    with make_engine(model, n_parallel=1, n_ctx=256) as e:
        with pytest.raises(PromptTooLong) as ei:
            e.submit("word " * 600, greedy(4))
        assert ei.value.n_ctx == e.n_ctx_slot and ei.value.n_prompt_tokens > 256


def test_handle_streams_from_another_thread(model):
    with make_engine(model, n_parallel=2) as e:
        e.start()
        h = e.submit(question("Count from one to twenty."), greedy(48, ignore_eos=True))
        seen = []

        def consume():
            for chunk in h:
                seen.append((chunk.text, h.done))

        t = threading.Thread(target=consume)
        t.start()
        t.join(timeout=120)
        assert not t.is_alive()
        assert h.done and h.n_generated == 48
        assert "".join(s for s, _ in seen) == h.text
        assert not seen[0][1], "the first chunk arrived while the request was still running"


def test_replacing_system_prompt_keeps_in_flight_requests_correct(model, vocab):
    other = "Answer every question with a single word.\n\n"
    q_old, q_new = question("Tell me about the moon."), question("What is the sun?")
    # references: each request alone, with its system prompt in its own tokens
    with make_engine(model, n_parallel=1, system_prompt=SYSTEM, share_system_prompt=False) as e:
        ref_old = e.submit(q_old, greedy(24, ignore_eos=True))
        e.run_until_idle()
    with make_engine(model, n_parallel=1, system_prompt=other, share_system_prompt=False) as e:
        ref_new = e.submit(q_new, greedy(12, ignore_eos=True))
        e.run_until_idle()
    with make_engine(model, n_parallel=2, system_prompt=SYSTEM) as e:
        a = e.submit(q_old, greedy(24, ignore_eos=True))
        step_until(e, lambda: a.n_generated >= 4)
        e.set_system_prompt(other)  # while a is generating: nothing waits
        b = e.submit(q_new, greedy(12, ignore_eos=True))
        e.step()
        assert not a.done and b.slot_id >= 0
        e.run_until_idle()
        assert a.text == ref_old.text, "the in-flight request kept its old prefix"
        assert b.text == ref_new.text, "the new request continued the new system prompt"
        assert b.n_cached_tokens == len(vocab.tokenize(other, add_special=True))
        # a's slot was given the new prefix when it was released
        assert e.seq_pos_max(e.slots[a.slot_id].seq_id) == b.n_cached_tokens - 1


def _run_parallel(*extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "parallel.py"), "-c", "2048",
         "-t", str(N_THREADS), "--json", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parallel_example_end_to_end(library):
    summary = _run_parallel("-np", "2", "-ns", "4", "-n", "16", "-s", "1")
    assert summary["n_requests"] == 4
    assert summary["total_gen_tokens"] > 0 and summary["total_prompt_tokens"] > 0
    assert 0 < summary["decode_share"] <= 1
    # deterministic for a fixed seed, with sampling at temperature 0.8
    again = _run_parallel("-np", "2", "-ns", "4", "-n", "16", "-s", "1")
    assert [r["response"] for r in again["requests"]] == [r["response"] for r in summary["requests"]]


def test_parallel_example_without_model_says_what_to_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "parallel.py"), "-m", str(tmp_path / "none.gguf")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "none.gguf" in out.stderr and "does not exist" in out.stderr


def test_long_prompt_prefilled_in_chunks_while_others_stream(model):
    with make_engine(model, n_parallel=2, prefill_chunk=64) as e:
        a = e.submit(question("Tell me a story."), greedy(80, ignore_eos=True))
        step_until(e, lambda: a.n_generated >= 2)
        b = e.submit(question("word " * 250), greedy(2, ignore_eos=True))
        steps = 0
        while b.n_generated == 0:
            before = a.n_generated
            e.step()
            steps += 1
            assert a.n_generated == before + 1, "a streams a token in every step of b's prefill"
        assert steps == -(-b.n_prompt_tokens // 64)  # ceil: 64 prompt tokens per step
        e.run_until_idle()
        assert a.n_generated == 80 and b.n_generated == 2


# -- prompt cache (llama-server's cache_prompt / slot prompt similarity) -----------------------

def _fresh(model, prompt, n: int, **kw) -> str:
    """The greedy output of a prompt on a new engine: nothing cached."""
    with make_engine(model, n_parallel=1, **kw) as e:
        h = e.submit(prompt, greedy(n, ignore_eos=True, cache_prompt=False))
        e.run_until_idle()
        assert h.n_cached_tokens == 0
        return h.text


def test_prompt_cache_same_prompt_twice_decodes_only_the_last_token(model):
    prompt = question("Describe the ocean in a few sentences.")
    with make_engine(model, n_parallel=1) as e:
        a = e.submit(prompt, greedy(16, ignore_eos=True))
        e.run_until_idle()
        n = len(a.prompt_tokens)
        assert (a.n_cached_tokens, a.n_prompt_tokens) == (0, n)
        before = e.stats.n_prompt_tokens
        b = e.submit(prompt, greedy(16, ignore_eos=True))
        e.run_until_idle()
        # everything but the last prompt token (decoded again for its logits) came from the cache
        assert (b.n_cached_tokens, b.n_prompt_tokens) == (n - 1, 1)
        assert e.stats.n_prompt_tokens - before == 1
        assert e.stats.n_prompt_tokens_cached == n - 1
        assert b.text == a.text
    assert a.text == _fresh(model, prompt, 16)


def test_prompt_cache_picks_the_slot_sharing_a_prefix(model, vocab):
    prompts = [vocab.tokenize(question(q), add_special=True) for q in
               ("Tell me about the history of Rome.", "Name three colors.", "What is a prime number?")]
    order = (1, 2, 0)  # prompts[0] lands in slot 2: the lowest-free-slot rule alone would not pick it
    with make_engine(model, n_parallel=3) as e:
        hs = [None] * 3
        for k in order:
            hs[k] = e.submit(prompts[k], greedy((12, 4, 6)[k], ignore_eos=True))
        e.run_until_idle()
        assert [hs[k].slot_id for k in order] == [0, 1, 2]
        follow = np.concatenate([prompts[0], vocab.tokenize(" Answer briefly.\n", add_special=False)])
        before = e.stats.n_prompt_tokens
        f = e.submit(follow, greedy(8, ignore_eos=True))
        e.run_until_idle()
        assert f.slot_id == hs[0].slot_id
        assert f.n_cached_tokens >= len(prompts[0])
        assert e.stats.n_prompt_tokens - before == f.n_prompt_tokens == len(follow) - f.n_cached_tokens
    # with similarity selection off, the lowest free slot is taken instead (slot 0, which
    # holds prompts[1]): its cache is still reused as far as it matches
    with make_engine(model, n_parallel=3, slot_prompt_similarity=0.0) as e:
        for k in order:
            e.submit(prompts[k], greedy((12, 4, 6)[k], ignore_eos=True))
        e.run_until_idle()
        g = e.submit(follow, greedy(8, ignore_eos=True))
        e.run_until_idle()
        n_common = next(i for i, (u, v) in enumerate(zip(prompts[1], follow)) if u != v)
        assert g.slot_id == 0 and g.n_cached_tokens == n_common < len(prompts[0])
    assert f.text == g.text == _fresh(model, follow, 8)


def test_cache_prompt_false_decodes_the_whole_prompt(model):
    prompt = question("Describe the ocean in a few sentences.")
    with make_engine(model, n_parallel=1) as e:
        a = e.submit(prompt, greedy(8, ignore_eos=True))
        e.run_until_idle()
        before = e.stats.n_prompt_tokens
        b = e.submit(prompt, greedy(8, ignore_eos=True, cache_prompt=False))
        e.run_until_idle()
        n = len(b.prompt_tokens)
        assert (b.n_cached_tokens, b.n_prompt_tokens) == (0, n)
        assert e.stats.n_prompt_tokens - before == n
        assert e.stats.n_prompt_tokens_cached == 0
        assert b.text == a.text


def test_prompt_cache_not_reused_after_system_prompt_replaced(model, vocab):
    other = "Answer every question with a single word.\n\n"
    n_other = len(vocab.tokenize(other, add_special=True))
    q = question("Tell me about the moon.")
    with make_engine(model, n_parallel=1, system_prompt=other) as e:
        ref = e.submit(q, greedy(12, ignore_eos=True, cache_prompt=False))
        e.run_until_idle()
    with make_engine(model, n_parallel=1, system_prompt=SYSTEM) as e:
        a = e.submit(q, greedy(12, ignore_eos=True))
        step_until(e, lambda: a.n_generated >= 3)
        e.set_system_prompt(other)  # while a runs: its tokens continue the old prompt
        e.run_until_idle()
        b = e.submit(q, greedy(12, ignore_eos=True))
        e.run_until_idle()
        assert b.n_cached_tokens == n_other and b.n_prompt_tokens == len(b.prompt_tokens)
        assert b.text == ref.text
        # the same prompt again, now on the new system prompt: reused
        c = e.submit(q, greedy(12, ignore_eos=True))
        e.run_until_idle()
        assert c.n_cached_tokens == n_other + len(c.prompt_tokens) - 1
        assert c.text == ref.text
        # replaced while the slot is idle: its cache goes too
        e.set_system_prompt(SYSTEM)
        d = e.submit(q, greedy(12, ignore_eos=True))
        e.run_until_idle()
        assert d.n_cached_tokens == len(vocab.tokenize(SYSTEM, add_special=True))
        assert d.text == a.text


def _long_text(n_items: int, topic: str) -> str:
    return " ".join(f"Note {i}: the {topic} number {i} weighs {i * 7 % 13} kilograms." for i in range(n_items))


def test_prompt_cache_beyond_the_sliding_window(model, vocab):
    # Gemma 3's sliding window is 512. With n_ubatch 64 the SWA cache of a sequence has
    # pad(512 + 64, 256) = 768 cells, so a sequence longer than that has lost its first
    # positions there and cannot continue from an early position.
    assert model.n_swa == 512
    cfg = dict(n_ctx=4096, n_ubatch=64)
    x = vocab.tokenize(_long_text(60, "red box"), add_special=True)
    y = vocab.tokenize(" " + _long_text(35, "blue jar"), add_special=False)
    z = vocab.tokenize(" " + question("Which note is the heaviest?"), add_special=False)
    assert len(x) > 600 and len(x) + len(y) > 1000
    xq, xy, xz = np.concatenate([x, z]), np.concatenate([x, y]), np.concatenate([x, y[:3], z])
    refs = {}
    with make_engine(model, n_parallel=1, **cfg) as e:
        for name, p in (("xq", xq), ("xy", xy), ("xz", xz)):
            refs[name] = e.submit(p, greedy(6, ignore_eos=True, cache_prompt=False))
            e.run_until_idle()
    with make_engine(model, n_parallel=1, **cfg) as e:
        seq = e.slots[0].seq_id
        a = e.submit(xq, greedy(6, ignore_eos=True))
        e.run_until_idle()
        b = e.submit(xq, greedy(6, ignore_eos=True))
        e.run_until_idle()
        assert b.n_cached_tokens == len(xq) - 1 > 600  # all within the SWA cells: reused
        assert a.text == b.text == refs["xq"].text
        c = e.submit(xy, greedy(6, ignore_eos=True))  # continues from position len(x) > 512
        e.run_until_idle()
        assert c.n_cached_tokens >= len(x) and c.text == refs["xy"].text
        assert e.memory.seq_pos_min(seq) > 0, "the long sequence lost its first SWA positions"
        # continuing from len(x) + 3 needs positions the SWA cache no longer holds
        d = e.submit(xz, greedy(6, ignore_eos=True))
        e.run_until_idle()
        assert (d.n_cached_tokens, d.n_prompt_tokens) == (0, len(xz))
        assert d.text == refs["xz"].text
    with make_engine(model, n_parallel=1, swa_full=True, **cfg) as e:
        for p in (xy, xz):  # a full-size SWA cache keeps everything: reused
            h = e.submit(p, greedy(6, ignore_eos=True))
            e.run_until_idle()
        assert h.n_cached_tokens >= len(x) + 3
        assert h.text == refs["xz"].text


def test_unified_kv_drops_idle_prompt_caches_before_failing(model):
    # 512 shared cells: an idle slot's cached ~350 tokens must make room for another request
    with make_engine(model, n_parallel=2, n_ctx=512, kv_unified=True) as e:
        a = e.submit("Mathematics has a long history. " * 8, greedy(300, ignore_eos=True))
        e.run_until_idle()
        assert a.finish_reason == FinishReason.LENGTH
        seq_a = e.slots[a.slot_id].seq_id
        assert e.seq_pos_max(seq_a) > 300
        b = e.submit("Music was played everywhere. " * 8,
                     greedy(300, ignore_eos=True, slot=1 - a.slot_id))  # the other slot
        e.run_until_idle()
        assert b.slot_id != a.slot_id
        assert b.finish_reason == FinishReason.LENGTH and b.n_generated == 300, b.error
        assert e.seq_pos_max(seq_a) == -1, "a's idle cache was dropped to make room"
        assert e.stats.n_requests_failed == 0


def test_every_decode_and_kv_call_runs_on_the_engine_thread(model, monkeypatch):
    """With start(), only the engine thread touches the llama_context: the warm-up, the system
    prompt (first and replaced), every request and state reads from other threads. An OpenMP
    libllama gives every decoding thread its own team, and two teams fight over the cores."""
    from llama_lib.context import Context, Memory

    seen: list[tuple[str, int]] = []

    def spy(cls, name):
        real = getattr(cls, name)

        def wrapper(self, *a, **kw):
            seen.append((name, threading.get_ident()))
            return real(self, *a, **kw)
        monkeypatch.setattr(cls, name, wrapper)

    spy(Context, "decode")
    spy(Context, "logits")
    for name in ("clear", "seq_rm", "seq_cp", "seq_pos_max", "seq_pos_min"):
        spy(Memory, name)
    e = make_engine(model, system_prompt=SYSTEM, warmup=True)
    assert not seen, f"the constructor touched the context: {seen}"
    try:
        e.start()
        engine_thread = e._thread.ident
        assert ("decode", engine_thread) in seen, "start() returns after the warm-up"
        n_warm = len(seen)
        e.submit(question("What is a llama?"), greedy(8)).result(60)
        e.set_system_prompt(SYSTEM + "User:\nHi\nAssistant:\nHello.\n")
        r = e.submit(question("Name a colour."), greedy(8))
        r.result(60)
        assert e.seq_pos_max(e.slots[r.slot_id].seq_id) > 0  # asked from this thread
        assert len(seen) > n_warm
        others = {(n, t) for n, t in seen if t != engine_thread}
        assert not others, f"calls from other threads: {others}"
    finally:
        e.close()


def test_a_steps_output_reaches_readers_when_the_step_ends(model, monkeypatch):
    """Chunks are held until step() returns (outbox.py): a reader woken mid-step would take
    the GIL at the step's next ctypes call and lengthen the step."""
    import llama_lib.engine.decode as decode_mod
    queued_mid_step = []
    take = decode_mod.take_token

    def watched(r, *args):
        before = r._stream.qsize()
        reason = take(r, *args)
        queued_mid_step.append(r._stream.qsize() - before)
        return reason

    monkeypatch.setattr(decode_mod, "take_token", watched)
    with make_engine(model) as e:
        a = e.submit(question("Name three colors."), greedy(6, ignore_eos=True))
        b = e.submit(question("Count to five."), greedy(6, ignore_eos=True))
        delivered = []
        while not (a.done and b.done):
            e.step()
            delivered.append((a._stream.qsize(), b._stream.qsize()))
        assert len(queued_mid_step) == 12 and not any(queued_mid_step), "nothing reaches a reader mid-step"
        assert delivered[0] == (1, 1), "the first token of each is there once the step has ended"
        assert delivered[-1] == (7, 7), "6 chunks and the end of each stream"
        assert [c.tokens[0] for c in a] == a.tokens and [c.tokens[0] for c in b] == b.tokens
    # outside a step (close(), no step running) a write is delivered at once
    with make_engine(model) as e:
        c = e.submit(question("Hello"), greedy(4))
    assert c.done and c.finish_reason == FinishReason.CANCELLED and list(c) == []


def watch_arrange(monkeypatch, placed: list, shapes: list | None = None) -> None:
    """Record the fillers of every step's layout (seq_order.arrange), and its ubatches."""
    import llama_lib.engine.decode as dec
    import llama_lib.engine.seq_order as so
    arrange = so.arrange

    def watched(e):
        f = arrange(e)
        placed.extend(f)
        if shapes is not None:
            ids, counts = np.unique(e.batch.seq_id[:e.batch.n_tokens, 0], return_counts=True)
            shapes.append(so.ubatch_shapes(ids, counts, e.ctx.n_ubatch))
        return f

    monkeypatch.setattr(dec, "arrange", watched)


def test_idle_slots_between_busy_ones_get_a_filler_and_keep_their_cache(model, monkeypatch):
    """With a KV stream per slot, an idle slot between two generating ones gets a throw-away
    token each step (seq_order.py) so that llama.cpp decodes the step in one ubatch; it is
    removed after the decode: the outputs are those of the same run without fillers, and the
    idle slot's cache is still reused afterwards."""
    import llama_lib.engine.seq_order as so
    placed = []
    watch_arrange(monkeypatch, placed)
    gaps = so.fillable_gaps

    def run(with_fillers: bool):
        monkeypatch.setattr(so, "fillable_gaps", gaps if with_fillers else (lambda e, present: {}))
        with make_engine(model, n_parallel=3, n_ctx=3 * 1024) as e:
            q = question("Name a big city.")
            first = e.submit(q, greedy(8, slot=1))
            e.run_until_idle()  # slot 1 keeps its tokens as a cache
            a = e.submit(question("Tell me about dogs."), greedy(24, ignore_eos=True, slot=0))
            b = e.submit(question("Tell me about cats."), greedy(24, ignore_eos=True, slot=2))
            e.run_until_idle()
            again = e.submit(q, greedy(8, slot=1))
            e.run_until_idle()
            return first.tokens, a.tokens, b.tokens, again.tokens, again.n_cached_tokens

    base = run(False)
    assert not placed
    got = run(True)
    assert len(placed) >= 20 and {sid for sid, _ in placed} == {2}, "slot 1 (sequence 2) is the gap"
    assert got == base
    assert got[4] > 0, "the idle slot's cache was reused"


def test_a_gap_filler_only_where_it_saves_passes(model):
    """Generated tokens of slots 1 and 3 decode in one pass with a filler for slot 2 (idle);
    two prompts there would make three passes with it and two without: no filler then. Two
    prompts side by side are padded to one pass, unless that runs past a slot's context."""
    from llama_lib.engine.seq_order import cheapest_layout

    with make_engine(model, n_parallel=3, n_ctx=3 * 1024) as e:
        ids, ends = np.array([1, 2, 3]), np.array([30, 5, 40])
        assert cheapest_layout(e, ids, np.array([1, 0, 1]), ends).tolist() == [1, 1, 1]
        assert cheapest_layout(e, ids, np.array([13, 0, 14]), ends).tolist() == [13, 0, 14]
        two = np.array([1, 2])
        assert cheapest_layout(e, two, np.array([10, 14]), np.array([10, 14])).tolist() == [14, 14]
        assert cheapest_layout(e, two, np.array([10, 14]), np.array([e.n_ctx_slot - 2, 14])).tolist() \
            == [10, 14], "no padding past a slot's context"


def test_already_packed_means_sorted_without_holes():
    """arrange() skips its sort and gap filling exactly when they would change nothing."""
    from hypothesis import given, strategies as st

    from llama_lib.engine.seq_order import already_packed

    @given(st.lists(st.integers(0, 9), max_size=12))
    def check(ids):
        seqs = np.array(ids, dtype=np.int32)
        expect = ids == sorted(ids) and (not ids or set(range(ids[0], ids[-1] + 1)) <= set(ids))
        assert already_packed(seqs) == expect

    check()


def test_prompts_admitted_together_are_padded_to_one_ubatch_and_answer_the_same(model, monkeypatch):
    """Four prompts of different lengths start in one step: with a KV stream per slot the
    shorter ones get throw-away rows up to the longest (seq_order.cheapest_layout), so llama.cpp's
    equal split makes one ubatch of the step instead of seven. Each answer is the one the
    prompt gets alone (the fillers come after its tokens: causal attention hides them), and
    no filler cell stays in the KV cache."""
    placed, shapes = [], []
    watch_arrange(monkeypatch, placed, shapes)
    texts = ["Name a city.", "Name a big city.", "Name a big old city.", "Name a big old city in Asia."]

    with make_engine(model, n_parallel=4, n_ctx=4 * 1024) as e:
        hs = [e.submit(question(t), greedy(10, ignore_eos=True)) for t in texts]
        e.run_until_idle()
        ends = [e.memory.seq_pos_max(s.seq_id) + 1 for s in e.slots]
        for i, h in enumerate(hs):  # each prompt alone, in the slot it had
            alone = e.submit(question(texts[i]), greedy(10, ignore_eos=True, slot=h.slot_id, cache_prompt=False))
            e.run_until_idle()
            assert alone.tokens == h.tokens, f"prompt {i}"
    lengths = [len(h.prompt_tokens) for h in hs]
    assert len(set(lengths)) > 1 and placed, "the shorter prompts were padded"
    assert shapes[0] == [(4, max(lengths))], "the prompt step was one ubatch"
    assert ends == [len(h.prompt_tokens) + 9 for h in sorted(hs, key=lambda h: h.slot_id)], \
        "the slots' caches hold their prompt and answer (the last token is never decoded), no filler"


def test_ubatch_shapes_follow_llama_cpp_equal_split():
    """The split the padding decision is based on (llama-batch.cpp, split_equal sequential)."""
    from llama_lib.engine.seq_order import decode_cost, ubatch_shapes

    ids = np.arange(1, 9)
    assert ubatch_shapes(ids, np.array([14] * 8), 512) == [(8, 14)]
    assert ubatch_shapes(ids, np.array([1] * 7 + [14]), 512) == [(8, 1), (1, 13)]
    uneven = np.array([12, 13, 14, 15, 13, 14, 15, 16])
    assert len(ubatch_shapes(ids, uneven, 512)) == 7
    assert decode_cost(ubatch_shapes(ids, np.full(8, 16), 512)) < decode_cost(ubatch_shapes(ids, uneven, 512))
    assert ubatch_shapes(np.array([1, 3]), np.array([2, 2]), 512) == [(1, 2), (1, 2)], "ids 1 and 3 are no run"
    assert ubatch_shapes(np.arange(1, 4), np.array([300] * 3), 512) == [(3, 170), (3, 130)]


@pytest.mark.parametrize("pack", [True, False])
def test_a_batch_is_decoded_in_order_of_sequence_ids(model, monkeypatch, pack):
    """A step that lists a generating slot's token before a lower slot's prompt is sorted
    before llama_decode (llama.cpp's equal split takes consecutive sequence ids in order);
    with pack_sequences=False the batch keeps llama.cpp's own order (generated tokens first)."""
    seen = []
    with make_engine(model, n_parallel=3, n_ctx=3 * 1024, pack_sequences=pack) as e:
        decode = e.ctx.decode

        def watched(view):
            n = e.batch.n_tokens
            seen.append(e.batch.seq_id[:n, 0].copy())
            return decode(view)

        monkeypatch.setattr(e.ctx, "decode", watched)
        a = e.submit(question("Tell me about dogs."), greedy(12, ignore_eos=True, slot=2))
        step_until(e, lambda: a.n_generated >= 2)
        b = e.submit(question("Tell me about cats."), greedy(4, ignore_eos=True, slot=0))
        e.run_until_idle()
    mixed = [s for s in seen if len(set(s.tolist())) > 1]
    assert mixed, "a step held both requests"
    assert all((np.diff(s) >= 0).all() for s in seen) == pack
    assert (2 in np.concatenate(seen)) == pack, "the idle slot 1 (sequence 2) got a filler"
    assert b.n_generated == 4 and a.n_generated == 12
