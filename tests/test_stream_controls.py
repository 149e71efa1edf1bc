"""Streaming controls (issue 31) on the real model: return_progress (prompt progress reports,
in the engine's stream and as llama-server's `prompt_progress` events), timings_per_token
(`timings` on every streamed event) and sse_ping_interval (the SSE comment ":" sent while a
stream waits, here in the queue behind another request).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import requests

from conftest import N_THREADS
from llama_lib import Chunk, Engine, EngineConfig, Progress, RequestParams, SamplingParams
from server_util import served

LONG = "the quick brown fox jumps over the lazy dog " * 8  # ~75 tokens: several chunks of 16 or 32
GREEDY = SamplingParams(temperature=0)


# -- engine -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, EngineConfig(n_parallel=2, n_ctx=1024, n_batch=16, n_threads=N_THREADS,
                                   n_threads_batch=N_THREADS))
    e.start()
    yield e
    e.close()


def check_progress(items: list, n_batch: int) -> list[Progress]:
    """The reports come first, in order, from processed == cache to processed == total."""
    reports = [x for x in items if isinstance(x, Progress)]
    first_chunk = next(i for i, x in enumerate(items) if isinstance(x, Chunk))
    assert all(isinstance(x, Progress) for x in items[:first_chunk])
    assert not any(isinstance(x, Progress) for x in items[first_chunk:]), "all before the first token"
    assert reports[0].processed == reports[0].cache
    assert reports[-1].processed == reports[-1].total
    for a, b in zip(reports, reports[1:]):
        assert (b.total, b.cache) == (a.total, a.cache)
        assert a.processed < b.processed <= a.processed + n_batch  # one report per decoded chunk
        assert b.time_ms >= a.time_ms
    return reports


def test_engine_reports_progress_chunk_by_chunk(engine):
    r = engine.submit(LONG, RequestParams(n_predict=2, return_progress=True, sampling=GREEDY))
    items = list(r)
    reports = check_progress(items, 16)
    n_prompt = reports[0].total
    assert len(reports) == 1 + -(-(n_prompt - reports[0].cache) // 16)
    assert r.text == "".join(x.text for x in items if isinstance(x, Chunk))
    # the same prompt again: its prefix is cached, the reports start there
    r2 = engine.submit(LONG, RequestParams(n_predict=2, return_progress=True, sampling=GREEDY))
    again = check_progress(list(r2), 16)
    assert again[0].cache > 0 and again[0].total == n_prompt and len(again) == 2


def test_engine_no_progress_unless_asked_and_async_for(engine):
    r = engine.submit(LONG + "again", RequestParams(n_predict=2, sampling=GREEDY))
    assert all(isinstance(x, Chunk) for x in r)

    async def read() -> list:
        req = engine.submit(LONG + "async", RequestParams(n_predict=2, return_progress=True))
        return [x async for x in req]
    check_progress(asyncio.run(read()), 16)


# -- server -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("stream_controls") / "server.log"
    t = str(N_THREADS)
    with served(["-np", "1", "-c", "1024", "-b", "32", "-t", t, "-tb", t], log, show_log=True) as s:
        yield s


def test_completion_progress_and_timings_per_token(server):
    events = server.stream("/completion", {"prompt": LONG, "n_predict": 3, "return_progress": True,
                                          "timings_per_token": True, "cache_prompt": False})
    progress = [e for e in events if "prompt_progress" in e]
    first_text = next(i for i, e in enumerate(events) if e["tokens_predicted"] > 0)
    assert events[:len(progress)] == progress and first_text == len(progress)
    pp = [e["prompt_progress"] for e in progress]
    assert len(pp) >= 3 and pp[0]["processed"] == pp[0]["cache"] and pp[-1]["processed"] == pp[-1]["total"]
    assert all(a["processed"] < b["processed"] for a, b in zip(pp, pp[1:]))
    assert set(pp[0]) == {"total", "cache", "processed", "time_ms"}
    # llama-server's progress partial: no text, its timings count the prompt so far
    first = progress[0]
    assert first["content"] == "" and first["stop"] is False and first["tokens_evaluated"] == pp[0]["total"]
    assert first["timings"]["prompt_n"] == 0 and first["timings"]["prompt_ms"] == 0.0
    for e in progress:
        assert e["timings"]["prompt_n"] == e["prompt_progress"]["processed"] - e["prompt_progress"]["cache"]
    assert progress[-1]["timings"]["prompt_ms"] > 0
    # every token's event carries the timings so far; the final object says the setting
    tokens = [e for e in events[first_text:] if not e["stop"]]
    assert [e["timings"]["predicted_n"] for e in tokens] == [e["tokens_predicted"] for e in tokens]
    assert all(e["timings"]["prompt_n"] == pp[-1]["total"] - pp[-1]["cache"] for e in tokens)
    assert events[-1]["stop"] and events[-1]["generation_settings"]["timings_per_token"] is True


def test_neither_unless_asked(server):
    events = server.stream("/completion", {"prompt": LONG, "n_predict": 2})
    assert not any("prompt_progress" in e for e in events)
    assert not any("timings" in e for e in events[:-1]) and "timings" in events[-1]
    # not streamed: return_progress changes nothing (llama-server sends progress in streams only)
    r = server.post("/completion", {"prompt": LONG, "n_predict": 2, "return_progress": True})
    assert r.status_code == 200 and "prompt_progress" not in r.json()


def test_chat_progress_and_timings_per_token(server):
    events = server.stream("/v1/chat/completions", {
        "messages": [{"role": "user", "content": LONG}], "max_tokens": 3, "return_progress": True,
        "timings_per_token": True, "cache_prompt": False, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    events = events[:-1]
    assert "timings" not in events[0] and "prompt_progress" not in events[0]  # the opening delta
    progress = [e for e in events if "prompt_progress" in e]
    assert progress == events[1:1 + len(progress)] and len(progress) >= 3
    for e in progress:  # llama-server repeats the opening delta with each report
        assert e["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert "timings" in e
    assert progress[-1]["prompt_progress"]["processed"] == progress[-1]["prompt_progress"]["total"]
    content = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert content and all("timings" in e for e in content)
    assert [e["timings"]["predicted_n"] for e in content] == sorted(e["timings"]["predicted_n"] for e in content)
    assert "usage" in events[-1] and "timings" in events[-1]


def test_oai_completion_progress(server):
    events = server.stream("/v1/completions", {"prompt": LONG, "max_tokens": 2, "return_progress": True,
                                               "cache_prompt": False})
    progress = [e for e in events[:-1] if "prompt_progress" in e]
    assert len(progress) >= 3 and progress == events[:len(progress)]
    assert all(e["choices"][0]["text"] == "" and "timings" not in e for e in progress)


@pytest.mark.parametrize("field,value", [("sse_ping_interval", -2), ("sse_ping_interval", "1"),
                                         ("timings_per_token", "yes"), ("return_progress", 1)])
def test_bad_values_refused(server, field, value):
    r = server.post("/completion", {"prompt": "hi", "n_predict": 1, "stream": True, field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"]


def test_sse_ping_while_queued(server):
    """With the one slot busy, a stream waiting in the queue gets ":" about every second, and
    none after its first event."""
    busy = requests.post(server.url + "/completion", stream=True, timeout=300, json={
        "prompt": "Count to one thousand:", "n_predict": 900, "ignore_eos": True, "stream": True,
        "cache_prompt": False})
    assert busy.status_code == 200
    seen: list[tuple[float, bytes]] = []
    two_pings = threading.Event()

    def read() -> None:
        t0 = time.monotonic()
        with requests.post(server.url + "/completion", stream=True, timeout=300, json={
                "prompt": "Say hi", "n_predict": 2, "stream": True, "sse_ping_interval": 1}) as r:
            for line in r.iter_lines():
                if line:
                    seen.append((time.monotonic() - t0, line))
                    if sum(1 for _, x in seen if x == b":") >= 2:
                        two_pings.set()

    waiter = threading.Thread(target=read)
    waiter.start()
    try:
        assert two_pings.wait(60), seen
    finally:
        busy.close()  # the busy request is cancelled: the waiting one runs
    waiter.join(120)
    pings = [t for t, line in seen if line == b":"]
    first_data = next(t for t, line in seen if line.startswith(b"data: "))
    assert all(t < first_data for t in pings), seen
    gaps = [b - a for a, b in zip([0.0] + pings, pings)]
    assert all(0.8 < g < 2.5 for g in gaps), gaps
    assert seen[-1][1].startswith(b"data: ") and b'"stop":true' in seen[-1][1]
