"""The step's prompt budget goes to the prompts nearest their first token (prefill_order.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, RequestParams, SamplingParams
from llama_lib.engine.prefill_order import PrefillOrder
from llama_lib.engine.slot import PREFILL, Slot

OVERHEAD = 30.0  # a step with eight generating slots, in tokens


def prefilling(sid: int, n_prompt: int, submitted: float, done: int = 0, priority: int = 0) -> Slot:
    s = Slot(sid)
    s.phase, s.prompt_pos = PREFILL, done
    s.req = SimpleNamespace(prompt_tokens=np.zeros(n_prompt, np.int32),
                            params=SimpleNamespace(priority=priority), timings=SimpleNamespace(submitted=submitted))
    return s


def test_prompts_of_a_hundred_tokens_go_one_a_step_shortest_first():
    order = PrefillOrder()
    slots = [prefilling(0, 140, 1.0), prefilling(1, 120, 1.0), prefilling(2, 130, 1.0)]
    assert [(s.id, n) for s, n in order.pieces(slots, 512, OVERHEAD)] == [(1, 120)]


def test_short_prompts_share_a_step():
    order = PrefillOrder()
    slots = [prefilling(k, 12 + k, 1.0) for k in range(6)]
    assert sorted(s.id for s, _ in order.pieces(slots, 512, OVERHEAD)) == list(range(6))


def test_whole_prompts_without_a_budget_as_before():
    slots = [prefilling(0, 900, 2.0), prefilling(1, 100, 1.0)]
    assert [(s.id, n) for s, n in PrefillOrder().pieces(slots, 0, OVERHEAD)] == [(0, 900), (1, 100)]


def test_a_long_prompt_is_not_starved_and_never_delays_a_first_token():
    order = PrefillOrder()
    order.seconds_per_token = 2e-3
    long_, short = prefilling(0, 3000, 0.0, done=512), prefilling(1, 100, 1.0)
    # fresh short prompt first; the long one gets no piece beside it (it would delay its first token)
    assert [(s.id, n) for s, n in order.pieces([long_, short], 512, OVERHEAD)] == [(1, 100)]
    # a short prompt arriving after the long one's alone-finish time waits for a piece of it
    late = prefilling(1, 100, 6.0)
    assert [(s.id, n) for s, n in order.pieces([long_, late], 512, OVERHEAD)] == [(0, 512)]
    # alone, the long prompt takes the budget
    assert [(s.id, n) for s, n in order.pieces([long_], 512, OVERHEAD)] == [(0, 512)]


def test_priority_goes_first():
    slots = [prefilling(0, 50, 1.0, priority=1), prefilling(1, 200, 2.0, priority=0)]
    assert [s.id for s, _ in PrefillOrder().pieces(slots, 512, OVERHEAD)] == [1]


def test_simultaneous_prompts_get_first_tokens_one_after_another_same_output(model, vocab):
    """Four ~130-token prompts submitted together: each gets its first token in its own step
    (the first after one prompt's work, not four), and greedy outputs are what each gives alone."""
    text = "User:\nRead this log and say which step failed: " + " ".join(
        f"step {k} finished in {k * 7 % 13} ms;" for k in range(14)) + "\nAssistant:\n"
    prompts = [text.replace("Read", w) for w in ("Read", "Scan", "Check", "Study")]
    assert all(110 <= len(vocab.tokenize(p, add_special=True, parse_special=True)) <= 200 for p in prompts)
    params = RequestParams(n_predict=4, sampling=SamplingParams(temperature=0))
    cfg = dict(n_parallel=4, n_ctx=4096, n_threads=N_THREADS, n_threads_batch=N_THREADS, cache_ram_mib=0)
    alone = []
    with Engine(model, EngineConfig(**cfg)) as e:
        for p in prompts:
            r = e.submit(p, params)
            while not r.done:
                e.step()
            alone.append(r.text)
    with Engine(model, EngineConfig(**cfg)) as e:
        e.step()  # the warm-up
        reqs = [e.submit(p, params) for p in prompts]
        first_step = {}
        for k in range(1, 40):
            e.step()
            for i, r in enumerate(reqs):
                if r.tokens and i not in first_step:
                    first_step[i] = k
            if all(r.done for r in reqs):
                break
        assert sorted(first_step.values()) == [1, 2, 3, 4], first_step
        assert [r.text for r in reqs] == alone
