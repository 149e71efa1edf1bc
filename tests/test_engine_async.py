"""The engine from asyncio and from callbacks, on the real model: streams, results, cancellation,
callback order, a raising or slow callback."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, FinishReason, RequestParams, SamplingParams

TOPICS = ("rivers", "bread", "stars", "music", "winter", "trains", "bees", "clocks")


def prompts(n: int) -> list[str]:
    return [f"User:\nTell me one fact about {TOPICS[i % len(TOPICS)]} number {i}.\nAssistant:\n"
            for i in range(n)]


def greedy(n: int) -> RequestParams:
    return RequestParams(n_predict=n, sampling=SamplingParams(temperature=0))


def make_engine(model, n_parallel: int = 4) -> Engine:
    return Engine(model, EngineConfig(n_parallel=n_parallel, n_ctx=512 * (n_parallel + 1),
                                      n_threads=N_THREADS, n_threads_batch=N_THREADS))


def run_blocking(model, texts: list[str], n: int) -> list[str]:
    """Reference: the same requests, submitted before the loop starts, read by iteration."""
    with make_engine(model) as e:
        reqs = [e.submit(t, greedy(n)) for t in texts]
        e.start()
        return ["".join(c.text for c in r) for r in reqs]


def test_64_async_streams_on_one_loop_match_blocking_iteration(model):
    texts = prompts(64)
    expected = run_blocking(model, texts, 8)

    async def main(e: Engine) -> tuple[list[str], list[str]]:
        reqs = [e.submit(t, greedy(8)) for t in texts]
        e.start()

        async def collect(r) -> str:
            return "".join([c.text async for c in r])

        streamed = await asyncio.gather(*(collect(r) for r in reqs))
        results = await asyncio.gather(*(r.aresult() for r in reqs))
        return list(streamed), list(results)

    n_threads = threading.active_count()
    with make_engine(model) as e:
        streamed, results = asyncio.run(main(e))
        assert threading.active_count() <= n_threads + 1  # the engine's thread, none per request
    assert streamed == expected
    assert results == expected
    assert all(expected)


def test_cancelling_the_awaiting_task_cancels_the_request_and_frees_its_slot(model):
    async def main(e: Engine):
        r = e.submit(prompts(1)[0], greedy(400))
        first = asyncio.Event()

        async def reader():
            async for _ in r:
                first.set()

        task = asyncio.create_task(reader())
        await asyncio.wait_for(first.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # aresult() of a finished request returns at once; of a cancelled waiter cancels too
        r2 = e.submit(prompts(2)[1], greedy(400))
        t2 = asyncio.create_task(r2.aresult())
        await asyncio.sleep(0.2)
        t2.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t2
        return r, r2

    with make_engine(model, n_parallel=1).start() as e:
        r, r2 = asyncio.run(main(e))
        assert r.wait(10) and r2.wait(10)
        assert r.finish_reason == FinishReason.CANCELLED and r.n_generated < 400
        assert r2.finish_reason == FinishReason.CANCELLED and r2.n_generated < 400
        # the one slot is free again: a new request is served
        assert e.submit(prompts(3)[2], greedy(4)).result(30)
        assert e.stats.n_requests_cancelled == 2


def test_async_reads_work_from_successive_event_loops(model):
    with make_engine(model, n_parallel=2).start() as e:
        a = asyncio.run(e.submit(prompts(1)[0], greedy(6)).aresult())
        b = asyncio.run(e.submit(prompts(1)[0], greedy(6)).aresult())
    assert a and a == b


def test_callbacks_in_order_and_on_done_exactly_once(model):
    texts = prompts(6)
    expected = run_blocking(model, texts, 10)
    got: dict[int, list[str]] = {i: [] for i in range(len(texts))}
    done: list[tuple[int, str, str]] = []
    all_done = threading.Event()
    lock = threading.Lock()
    callers: set[str] = set()

    def on_done(i):
        def f(req):
            with lock:
                done.append((i, req.finish_reason, req.text))
                if len(done) == len(texts):
                    all_done.set()
        return f

    def on_chunk(i):
        def f(chunk):
            callers.add(threading.current_thread().name)
            got[i].append(chunk.text)
        return f

    with make_engine(model) as e:
        for i, t in enumerate(texts):
            e.submit(t, greedy(10), on_chunk=on_chunk(i), on_done=on_done(i))
        e.start()
        assert all_done.wait(60)
    time.sleep(0.2)  # a second on_done would have come by now
    assert sorted(i for i, _, _ in done) == list(range(len(texts)))
    for i, reason, text in done:
        assert "".join(got[i]) == text == expected[i]
        assert reason in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP)
    assert callers and not any(n == "llama-engine" for n in callers)


def test_on_done_for_a_cancelled_request_and_without_on_chunk_the_stream_stays(model):
    ended = threading.Event()
    seen = []
    with make_engine(model, n_parallel=1).start() as e:
        r = e.submit(prompts(1)[0], greedy(300), on_done=lambda req: (seen.append(req.finish_reason), ended.set()))
        first = next(iter(r))  # no on_chunk: the request is still iterable
        assert first.tokens
        r.cancel()
        assert ended.wait(10)
    assert seen == [FinishReason.CANCELLED]


def test_a_raising_callback_fails_only_its_request(model):
    texts = prompts(2)
    expected = run_blocking(model, texts, 12)
    ended = threading.Event()
    finished: list = []
    calls = []

    def bad(chunk):
        calls.append(chunk)
        if len(calls) == 2:
            raise ValueError("application bug")

    with make_engine(model, n_parallel=2) as e:
        failing = e.submit(texts[0], greedy(12), on_chunk=bad, on_done=lambda r: (finished.append(r), ended.set()))
        fine = e.submit(texts[1], greedy(12))
        e.start()
        assert fine.result(60) == expected[1]
        assert ended.wait(30)
        assert e.submit(texts[0], greedy(12)).result(60) == expected[0]  # the engine serves on
        assert e.stats.n_requests_failed == 1
    assert finished == [failing]
    assert failing.finish_reason == FinishReason.ERROR
    assert "on_chunk raised ValueError: application bug" in failing.error
    assert len(calls) == 2  # nothing delivered after the failure


def test_a_slow_callback_does_not_stall_the_engine(model):
    release = threading.Event()
    ended = threading.Event()

    def slow(chunk):
        release.wait(30)

    with make_engine(model, n_parallel=2).start() as e:
        slow_req = e.submit(prompts(1)[0], greedy(20), on_chunk=slow, on_done=lambda r: ended.set())
        t0 = time.perf_counter()
        other = e.submit(prompts(2)[1], greedy(20)).result(60)
        assert other and time.perf_counter() - t0 < 20
        assert slow_req.wait(30)  # generation finished although its first callback still runs
        assert not ended.is_set()
        release.set()
        assert ended.wait(10)
    assert slow_req.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


# -- the example application: Starlette on uvicorn, the engine in-process ----------------------

def test_asgi_example_streams_sse_and_a_disconnect_frees_the_slot(tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    import json
    import subprocess
    import sys

    import requests

    from conftest import ROOT
    from server_util import free_port

    port = free_port()
    log = open(tmp_path / "asgi.log", "wb")
    proc = subprocess.Popen([sys.executable, "examples/asgi_app.py", "--port", str(port), "-np", "2",
                             "-c", "2048", "-t", str(N_THREADS)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "asgi.log").read_text()
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the example did not come up"
            time.sleep(0.2)
        body = {"prompt": prompts(1)[0], "n_predict": 12, "temperature": 0}
        whole = requests.post(url + "/generate", json=body, timeout=60).json()
        events = []
        with requests.post(url + "/generate", json={**body, "stream": True}, stream=True, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
        assert len(events) > 2 and events[-1]["done"] is True
        assert "".join(e["text"] for e in events[:-1]) == whole["text"] and whole["text"]
        assert events[-1]["n_generated"] == whole["n_generated"] == 12
        assert requests.post(url + "/generate", json={"n_predict": 3}, timeout=10).status_code == 400

        # a client that goes away mid-stream: its request is cancelled, the slot freed
        r = requests.post(url + "/generate", json={**body, "n_predict": 600, "ignore_eos": True, "stream": True},
                          stream=True, timeout=60)
        lines = r.iter_lines()  # kept: a dropped generator would close the connection
        next(lines)
        assert requests.get(url + "/health", timeout=5).json()["busy_slots"] == 1
        r.close()
        deadline = time.monotonic() + 20
        while (h := requests.get(url + "/health", timeout=5).json())["busy_slots"] != 0:
            assert time.monotonic() < deadline, "the slot stayed busy after the client left"
            time.sleep(0.1)
        assert h["cancelled"] == 1  # freed by the cancellation, not by an end of text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0 or proc.returncode == -15
        log.close()
