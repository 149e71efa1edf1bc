"""Scheduling between users in the engine (waiting.py, preempt.py): fair queueing over decoded
tokens, priorities, per-user queue limits, and preemption that parks a request's KV in host RAM
and resumes it token for token. On the real model; engines are stepped by hand (not started),
so the order of events is exact."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import N_THREADS
from test_engine import step_until
from llama_lib import Engine, EngineConfig, FinishReason, QueueFull, RequestParams, SamplingParams, UserQueueFull

PROMPT = "User: Tell me a long story about a dragon and a knight.\nAssistant:"
OTHER = "User: What is the capital of France? Answer in one word.\nAssistant:"


def greedy(n: int = 24, **kw) -> RequestParams:
    return RequestParams(n_predict=n, ignore_eos=True, sampling=SamplingParams(temperature=0), **kw)


def engine(model, n_parallel: int = 1, **kw) -> Engine:
    kw.setdefault("n_ctx", 512 * (n_parallel + 1))
    kw.setdefault("cache_ram_mib", 0)
    kw.setdefault("warmup", False)
    return Engine(model, EngineConfig(n_parallel=n_parallel, n_threads=N_THREADS, **kw))


def order_started(hs) -> list:
    return sorted(hs, key=lambda h: h.timings.started)


def no_leak(e: Engine) -> None:
    """Every slot is idle and its sequence holds exactly its cache; nothing is parked."""
    assert not any(s.busy for s in e.slots) and e.n_waiting == 0
    for s in e.slots:
        assert e.memory.seq_pos_max(s.seq_id) == s.n_prefix + len(s.cache_tokens) - 1
    assert e.sched.n_parked_bytes == 0


@pytest.fixture(scope="module")
def reference(model):
    """PROMPT's greedy output alone, on one slot."""
    with engine(model) as e:
        h = e.submit(PROMPT, greedy(32))
        e.run_until_idle()
        return h.tokens


@pytest.mark.parametrize("schedule", ["fair", "fcfs"])
def test_two_users_interleave_under_fair_queueing(model, schedule):
    with engine(model, schedule=schedule, preempt_after_ms=-1) as e:
        a = [e.submit(OTHER, greedy(4, user="a")) for _ in range(4)]
        b = [e.submit(OTHER, greedy(4, user="b")) for _ in range(2)]
        e.run_until_idle()
        users = [h.params.user for h in order_started(a + b)]
        info = {u["user"]: u for u in e.users_info()}
    if schedule == "fair":  # one slot: whoever has had fewer tokens goes next
        assert users == ["a", "b", "a", "b", "a", "a"]
    else:
        assert users == ["a"] * 4 + ["b"] * 2
    assert info["a"]["n_started"] == 4 and info["b"]["n_started"] == 2
    assert info["b"]["n_waiting"] == 0 and info["a"]["wait_s_mean"] > 0


def test_a_lone_user_is_served_first_come_first_served(model):
    with engine(model) as e:
        hs = [e.submit(OTHER, greedy(2, user="solo")) for _ in range(4)]
        e.run_until_idle()
        assert order_started(hs) == hs and e.sched.stats.n_preempted == 0


def test_lower_priority_runs_first(model):
    with engine(model, preempt_after_ms=-1) as e:
        hs = [e.submit(OTHER, greedy(2, priority=p)) for p in (5, 0, -1, 0)]
        e.run_until_idle()
        assert [h.params.priority for h in order_started(hs)] == [-1, 0, 0, 5]
        assert order_started(hs)[1] is hs[1]  # FCFS among equals


def test_queue_limit_per_user_refuses_that_user_only(model):
    with engine(model, max_queue_per_user=2, preempt_after_ms=-1) as e:
        first = e.submit(OTHER, greedy(8, user="a"))
        e.step()  # admitted: now every slot is busy
        assert first.slot_id == 0
        e.submit(OTHER, greedy(2, user="a"))
        e.submit(OTHER, greedy(2, user="a"))
        with pytest.raises(UserQueueFull) as err:
            e.submit(OTHER, greedy(2, user="a"))
        assert isinstance(err.value, QueueFull) and err.value.retry_after >= 1 and err.value.user == "a"
        b = e.submit(OTHER, greedy(2, user="b"))  # another user still gets in
        e.run_until_idle()
        assert b.finish_reason == FinishReason.LENGTH
        assert {u["user"]: u["n_refused"] for u in e.users_info()} == {"a": 1, "b": 0}


def test_preempted_request_resumes_token_for_token(model, reference):
    with engine(model, preempt_after_ms=0, cache_ram_mib=16) as e:
        low = e.submit(PROMPT, greedy(32, user="batch", priority=5))
        step_until(e, lambda: low.n_generated >= 10)
        high = e.submit(OTHER, greedy(6, user="chat"))
        e.step()  # the high-priority request takes the slot; `low` is parked in RAM
        assert low.parked is not None and low.parked.data and e.sched.n_parked_bytes > 0
        assert e.cache.ram.n_reserved == len(low.parked.data)  # counted against --cache-ram
        assert e.slots[0].req is high
        n_parked = low.n_generated
        step_until(e, lambda: high.done)
        assert low.n_generated == n_parked  # its stream paused
        e.run_until_idle()
        assert low.tokens == reference and low.finish_reason == FinishReason.LENGTH
        assert high.timings.first_token_s < low.timings.total_s
        st = e.sched.stats
        assert (st.n_preempted, st.n_resumed) == (1, 1)
        assert {u["user"]: u["n_preempted"] for u in e.users_info()} == {"batch": 1, "chat": 0}
        assert e.cache.ram.n_reserved == 0
        no_leak(e)


def test_a_user_far_below_its_share_preempts_and_outputs_stay_greedy(model):
    from test_prefix_share import same_greedy
    p = dataclasses.replace(greedy(40, user="a"), n_probs=2)
    with engine(model, n_parallel=2, preempt_after_ms=-1) as ref:
        want = [ref.submit(PROMPT, p), ref.submit(OTHER, p)]
        ref.run_until_idle()
    with engine(model, n_parallel=2, preempt_after_ms=0, cache_ram_mib=16) as e:
        a = [e.submit(PROMPT, p), e.submit(OTHER, p)]
        step_until(e, lambda: min(h.n_generated for h in a) >= 8)
        b = e.submit(OTHER, greedy(4, user="b"))
        before = [h.n_generated for h in a]
        e.step()
        assert b.slot_id >= 0 and sum(h.parked is not None for h in a) == 1
        # that step decoded b's prompt alone: b has its first token, a's running stream waited
        assert b.n_generated == 1 and [h.n_generated for h in a] == before
        e.run_until_idle()
        assert b.timings.done < max(h.timings.done for h in a)
        assert all(same_greedy(g, w) for g, w in zip(a, want)), [(g.text, w.text) for g, w in zip(a, want)]
        no_leak(e)


def test_a_parked_request_can_be_cancelled(model):
    with engine(model, preempt_after_ms=0, cache_ram_mib=16) as e:
        low = e.submit(PROMPT, greedy(32, priority=1))
        step_until(e, lambda: low.n_generated >= 4)
        high = e.submit(OTHER, greedy(8))
        e.step()
        assert low.parked is not None
        low.cancel()
        e.run_until_idle()
        assert low.finish_reason == FinishReason.CANCELLED and low.parked is None
        assert high.finish_reason == FinishReason.LENGTH
        assert e.stats.n_requests_cancelled == 1 and e.cache.ram.n_reserved == 0
        no_leak(e)


def test_parked_bytes_are_bounded_by_cache_ram(model):
    """A parked request's bytes count against --cache-ram: when they do not fit, the running
    request keeps its slot (and its output); without RAM or holders nothing is parked."""
    long_prompt = PROMPT * 4  # ~70 tokens of ~18 KB each: past 1 MiB
    for mib in (1, 0):
        with engine(model, preempt_after_ms=0, cache_ram_mib=mib) as e:
            low = e.submit(long_prompt, greedy(8, priority=1))
            step_until(e, lambda: low.n_generated >= 2)
            high = e.submit(OTHER, greedy(4))
            e.step()
            assert low.parked is None and e.slots[0].req is low and high.slot_id < 0
            e.run_until_idle()
            assert low.finish_reason == high.finish_reason == FinishReason.LENGTH
            assert low.timings.done < high.timings.started
            assert e.sched.stats.n_preempted == 0 and (e.sched.stats.n_no_room > 0) == bool(mib)


def test_ram_tier_entries_make_room_for_parked_bytes():
    from llama_lib.engine.ram_cache import RamCache
    import numpy as np
    ram = RamCache(limit_bytes=1000)
    for i in range(3):
        assert ram.put(np.arange(i * 100, i * 100 + 20, dtype=np.int32), 0, 0, bytes(300))
    ram.n_reserved = 300  # a parked request
    assert ram.make_room(250) and len(ram.entries) == 1 and ram.stats.n_evicted == 2
    ram.n_reserved += 250
    assert not ram.make_room(500) and not ram.entries  # the reserved bytes alone leave no room
    assert not ram.put(np.arange(20, dtype=np.int32), 0, 0, bytes(600))


def test_a_prefilling_request_can_be_preempted(model):
    """A long prompt going in 16-token pieces is parked half way and resumes its prefill."""
    long_prompt = PROMPT * 6
    with engine(model, prefill_chunk=16, cache_ram_mib=0) as ref:
        want = ref.submit(long_prompt, greedy(12))
        ref.run_until_idle()
    with engine(model, prefill_chunk=16, preempt_after_ms=0, cache_ram_mib=16) as e:
        low = e.submit(long_prompt, greedy(12, priority=1))
        e.step()
        e.step()
        assert e.slots[0].phase.value == "prefill" and 0 < e.slots[0].prompt_pos < len(low.prompt_tokens)
        high = e.submit(OTHER, greedy(4))
        e.step()
        assert low.parked is not None and low.parked.phase.value == "prefill" and e.slots[0].req is high
        e.run_until_idle()
        assert low.tokens == want.tokens and high.finish_reason == FinishReason.LENGTH
        assert e.sched.stats.n_resumed == 1
        no_leak(e)


def test_with_unified_kv_a_request_parks_in_a_holder_without_a_copy(model, reference):
    with engine(model, n_ctx=1024, kv_unified=True, preempt_after_ms=0) as e:
        low = e.submit(PROMPT, greedy(32, priority=1))
        step_until(e, lambda: low.n_generated >= 6)
        high = e.submit(OTHER, greedy(4))
        e.step()
        pk = low.parked
        assert pk is not None and pk.seq > len(e.slots) and pk.data is None and e.sched.n_parked_bytes == 0
        assert e.memory.seq_pos_max(pk.seq) == pk.n_past - 1  # its cells, tagged with the holder's id
        seq = pk.seq
        e.run_until_idle()
        assert low.tokens == reference and high.finish_reason == FinishReason.LENGTH
        assert (e.sched.stats.n_in_holder, e.sched.stats.n_resumed) == (1, 1)
        assert e.memory.seq_pos_max(seq) == -1  # the holder is free again
        no_leak(e)


def test_a_parked_request_survives_a_full_kv_cache(model, reference):
    """Unified KV of 256 cells: while `low` is parked in a holder, `high` fills the cache to
    the last cell: `low` moves to host RAM to make room, and loads back, token for token."""
    with engine(model, n_ctx=256, kv_unified=True, preempt_after_ms=0) as e:
        low = e.submit(PROMPT, greedy(32, priority=1))
        step_until(e, lambda: low.n_generated >= 6)
        high = e.submit(OTHER, greedy(-1))  # until the slot is full
        e.run_until_idle()
        assert high.finish_reason == FinishReason.LENGTH and high.truncated
        assert e.share_stats()["kv_evictions"] >= 1
        st = e.sched.stats
        assert (st.n_in_holder, st.n_to_ram, st.n_resumed) == (1, 1, 1)
        assert low.tokens == reference and e.stats.n_requests_failed == 0


def test_bad_schedule_is_refused(model):
    with pytest.raises(ValueError):
        engine(model, schedule="lifo")
