"""Idle prefixes kept in spare KV sequences (holders.py, unified KV): more users than slots
still find their documents and chats in KV. Greedy output is the same as with sharing off; a
full cache evicts holders (to the RAM tier when it is on) and loses no request."""

from __future__ import annotations

import pytest

from test_prefix_share import GREEDY, QUESTIONS, WORDS, ask, assert_same, engine, run_together


def doc(d: int, n: int = 24) -> str:
    """Document d: the same list of words, rotated by d (~290 tokens)."""
    return " ".join(f"Item {i} of the list is the word {WORDS[(i + d) % 12]}." for i in range(n))


def serve_in_turn(e, prompts: list[str]) -> list:
    """One request at a time: each new document overwrites the slot that served the last."""
    return [run_together(e, [p])[0] for p in prompts]


def test_holders_keep_caches_a_single_slot_overwrites(model):
    # users 1 and 2 take turns on one slot; each return finds its document in a holder
    prompts = [ask(doc(1), QUESTIONS[0]), ask(doc(2), QUESTIONS[0]),
               ask(doc(1), QUESTIONS[1]), ask(doc(2), QUESTIONS[1])]
    with engine(model, share=False, kvu=True, n_parallel=1) as off:
        want = serve_in_turn(off, prompts)
        decoded_off = off.stats.n_prompt_tokens
    with engine(model, share=True, kvu=True, n_parallel=1, kv_holders=2) as e:
        assert e.config.n_holders == 2 and e.ctx.n_seq_max == 4
        got = serve_in_turn(e, prompts)
        st = e.share_stats()
        n_doc = len(model.vocab.tokenize(ask(doc(1), ""), add_special=True))
        assert st["holders_kept"] >= 2 and st["n_copies"] == 2
        assert st["tokens_shared"] >= 2 * (n_doc - 16) and e.stats.n_prompt_tokens_cached_kv >= st["tokens_shared"]
        assert e.stats.n_prompt_tokens <= decoded_off - 2 * (n_doc - 16)
        assert e.slots_info()[0]["prompt_cache"]["tier"] == "shared"
    assert_same(got, want)


def test_no_holders_without_a_unified_cache_or_when_turned_off(model):
    with engine(model, share=True, kvu=False, n_parallel=2) as e:
        assert e.config.n_holders == 0 and e.cache.holders is None and e.ctx.n_seq_max == 3
    with engine(model, share=True, kvu=True, n_parallel=2, kv_holders=0) as e:
        assert e.cache.holders is None and e.ctx.n_seq_max == 3


@pytest.mark.parametrize("ram_mib", [0, 64], ids=["ram-off", "ram-on"])
def test_a_full_cache_evicts_holders_and_loses_no_request(model, ram_mib):
    """Six documents through two slots in 1,024 cells: holders must go (to RAM when it is on)."""
    prompts = [ask(doc(d), QUESTIONS[d % 4]) for d in (1, 2, 3, 4, 5, 6, 1, 2)]
    with engine(model, share=False, kvu=True, n_parallel=2, n_ctx=1024) as off:
        want = run_together(off, prompts)
    with engine(model, share=True, kvu=True, n_parallel=2, n_ctx=1024, kv_holders=4, cache_ram_mib=ram_mib) as e:
        got = run_together(e, prompts)
        st = e.share_stats()
        assert e.stats.n_requests_failed == 0 and all(h.text for h in got)
        assert st["holders_kept"] >= 2 and st["kv_evictions"] >= 1
        if ram_mib:
            assert e.ram_cache_stats()["saved"] >= 1
    assert_same(got, want)


def test_an_evicted_holder_comes_back_from_ram(model):
    """One slot, one holder: document 1 goes slot -> holder -> RAM, and its user's return
    loads it back instead of decoding it."""
    prompts = [ask(doc(1), QUESTIONS[0]), ask(doc(2), QUESTIONS[0]), ask(doc(3), QUESTIONS[0]),
               ask(doc(1), QUESTIONS[1])]
    with engine(model, share=False, kvu=True, n_parallel=1) as off:
        want = serve_in_turn(off, prompts)
    with engine(model, share=True, kvu=True, n_parallel=1, kv_holders=1, cache_ram_mib=256) as e:
        got = serve_in_turn(e, prompts)
        st = e.share_stats()
        assert st["holders_evicted"] >= 1 and e.ram_cache_stats()["loaded"] == 1
        n_doc = len(model.vocab.tokenize(ask(doc(1), ""), add_special=True))
        assert st["tokens_ram"] >= n_doc - 16 and e.stats.n_prompt_tokens_cached_ram == st["tokens_ram"]
        assert e.slots_info()[0]["prompt_cache"] == {"tier": "ram", "n_tokens": st["tokens_ram"]}
    assert_same(got, want)


@pytest.mark.parametrize("kvu", [False, True], ids=["per-slot-kv-ram", "unified-kv-holders"])
def test_a_chats_own_turns_after_a_long_shared_text_are_kept(model, kvu):
    """Two chats on one slot, both starting with one ~290-token text: when one overwrites the
    other's cache, only the short own part is lost, yet that is what its next turn needs; it is
    kept aside (in RAM or a holder) and comes back."""
    base = f"System: {doc(0)}\n"
    a1, b1 = base + "User: Which item is harbor?\nAssistant:", base + "User: What is item 7?\nAssistant:"
    with engine(model, share=True, kvu=kvu, n_parallel=1, cache_ram_mib=256) as e:
        first = serve_in_turn(e, [a1, b1])
        a2 = a1 + first[0].text + "\nUser: And which item is apple?\nAssistant:"
        n_a1 = len(model.vocab.tokenize(a1 + first[0].text, add_special=True))
        h = serve_in_turn(e, [a2])[0]
        assert h.n_cached_tokens >= n_a1 - 4, (h.n_cached_tokens, n_a1)
        assert e.slots_info()[0]["prompt_cache"]["tier"] == ("shared" if kvu else "ram")
