"""The prompt cache's host-RAM tier (--cache-ram): a slot's cache about to be overwritten is kept
in RAM and loaded back for a later prompt that suits it, with the same greedy output as computing
the prompt again; off at 0; bounded by its limit; sliding-window prompts stay correct."""

from __future__ import annotations

import pytest

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, RequestParams, SamplingParams

DOC = " ".join(f"Item {i} of the list is the word {w}." for i, w in enumerate(
    "apple river stone cloud maple harbor lantern meadow violet copper thunder willow".split() * 2))
P1 = f"User: Read this list.\n{DOC}\nWhich item is the word harbor?\nAssistant:"
P2 = "User: Write a short poem about the sea and the wind, in the style of an old song.\nAssistant:"
GREEDY = RequestParams(n_predict=16, sampling=SamplingParams(temperature=0))


def run(e: Engine, prompt: str):
    h = e.submit(prompt, GREEDY)
    h.wait()
    assert h.error is None
    return h


@pytest.fixture(scope="module")
def engines(model):
    made = {}

    def make(mib: int, n_ctx: int = 4096) -> Engine:
        key = (mib, n_ctx)
        if key not in made:
            made[key] = Engine(model, EngineConfig(n_ctx=n_ctx, n_parallel=1, n_threads=N_THREADS,
                                                   cache_ram_mib=mib)).start()
        return made[key]
    yield make
    for e in made.values():
        e.close()


def test_an_overwritten_slot_cache_comes_back_from_ram(engines):
    e = engines(64)
    first = run(e, P1)
    assert first.n_cached_tokens == 0
    other = run(e, P2)  # the one slot is overwritten: P1's cache goes to RAM
    assert other.n_cached_tokens < 5  # "<bos>User:" is all they share
    ram = e.cache.ram
    assert len(ram.entries) == 1 and 0 < ram.n_bytes <= 64 << 20
    again = run(e, P1)
    assert again.n_cached_tokens == first.n_prompt_tokens - 1 and again.n_prompt_tokens == 1
    assert again.text == first.text  # token for token
    assert ram.stats.n_loaded == 1 and ram.stats.n_saved == 2  # P2's cache went to RAM in turn


def test_off_at_zero_and_bounded_by_the_limit(engines):
    off = engines(0)
    run(off, P1)
    run(off, P2)
    assert off.cache.ram is None and run(off, P1).n_cached_tokens < 5
    tiny = engines(1)  # a sequence of ~300 tokens is several MiB of KV: it does not fit
    run(tiny, P1)
    run(tiny, P2)
    assert tiny.cache.ram.n_bytes <= 1 << 20 and run(tiny, P1).n_cached_tokens < 5


def test_a_prompt_past_the_sliding_window_is_still_right(engines):
    e = engines(256, n_ctx=4096)
    long = f"User: Read this list.\n{DOC} {DOC} {DOC}\nWhich item is the word maple?\nAssistant:"
    first = run(e, long)
    assert first.n_prompt_tokens > 600  # beyond Gemma 3's 512-token window
    run(e, P2)
    again = run(e, long)
    assert again.text == first.text


def test_the_server_reports_the_ram_tier(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from server_util import served
    with served(["-np", "1", "-c", "4096", "--cache-ram", "64", "--metrics"], tmp_path / "server.log") as s:
        answers = []
        for prompt in (P1, P2, P1):
            r = s.post("/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0})
            assert r.status_code == 200
            answers.append(r.json())
        assert answers[2]["timings"]["cache_n"] == answers[0]["timings"]["prompt_n"] - 1
        assert answers[2]["content"] == answers[0]["content"]
        values = {sample.name: sample.value for fam in text_string_to_metric_families(s.get("/metrics").text)
                  for sample in fam.samples}
        assert values["llamacpp:cache_ram_loaded_total"] == 1
        assert values["llamacpp:cache_ram_saved_total"] == 2
        assert 0 < values["llamacpp:cache_ram_bytes"] <= 64 << 20
