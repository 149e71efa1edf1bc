"""EnginePool: several contexts over one model, its dispatcher, CPU sets, and the server on it.

Real library, real default model. The pool under test has two engines of one slot each, so
every context decodes one sequence at a time, exactly as a one-slot Engine does alone: the
greedy outputs must then be the same token for token.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from llama_lib import Batch, Context, ContextParams, Engine, EngineConfig, EnginePool, RequestParams
from llama_lib import cpuset
from llama_lib.engine.pool import split_config
from llama_lib.engine.prompt_cache import common_prefix
from llama_lib.sampler import SamplingParams
from server_util import ROOT, ServerProcess

SLOT_CTX = 256  # cells per slot
PROMPTS = [f"User:\nTell me about {w}.\nAssistant:\n" for w in ("cats", "the sea", "Rome", "trains")]
LONG = ("User:\nHere is a story about a lighthouse keeper who lived alone on a rocky island, kept "
        "a logbook of every ship that passed, and one winter found a message in a bottle.\n")


def greedy(n: int = 12, **kw) -> RequestParams:
    return RequestParams(n_predict=n, sampling=SamplingParams(temperature=0.0), **kw)


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def config(n_parallel: int, **kw) -> EngineConfig:
    return EngineConfig(n_parallel=n_parallel, n_ctx=SLOT_CTX * (n_parallel + 1), n_threads=1,
                        n_threads_batch=1, **kw)


@pytest.fixture(scope="module")
def reference(model):
    """One one-slot engine's greedy answers, one prompt at a time; the RSS one context adds."""
    before = rss_kb()
    with Engine(model, config(1)) as e:
        e.start()
        after = rss_kb()
        texts = [e.submit(p, greedy()).result(60) for p in PROMPTS]
    return texts, after - before


@pytest.fixture(scope="module")
def pool(model, reference):
    before = rss_kb()
    p = EnginePool.split(model, config(2), 2).start()
    p.rss_growth_kb = rss_kb() - before
    yield p
    p.close()


def idle(p: EnginePool) -> None:
    for e in p.engines:
        e.call(lambda: None, timeout=30)  # a call runs between steps: the engine is past them
    assert p.n_busy == 0 and p.n_waiting == 0


# -- the pool -------------------------------------------------------------------------------

def test_split_config_sizes_slots_like_one_engine():
    cfgs = split_config(EngineConfig(n_parallel=5, n_ctx=600, cpumask=(0, 1)), 2)
    assert [c.n_parallel for c in cfgs] == [3, 2]
    assert [c.n_ctx for c in cfgs] == [400, 300]  # 100 cells a slot, as 600 / (5 + 1)
    assert [c.cpumask for c in cfgs] == [(0,), (1,)]
    with pytest.raises(ValueError, match="at least 3 slots"):
        split_config(EngineConfig(n_parallel=2), 3)


def test_same_greedy_outputs_as_one_engine(pool, reference):
    texts, _ = reference
    hs = [pool.submit(p, greedy()) for p in PROMPTS]  # all at once: both engines decode
    assert [h.result(60) for h in hs] == texts
    assert {pool.engine_of(h.slot_id) for h in hs} == {0, 1}
    assert pool.stats.n_requests_done >= 4
    assert pool.stats.n_generated_tokens == sum(e.stats.n_generated_tokens for e in pool.engines)


def test_asyncio_and_callbacks_through_the_pool(pool, reference):
    import asyncio
    import threading

    hs = [pool.submit(p, greedy()) for p in PROMPTS]

    async def both():
        return await asyncio.gather(*(h.aresult() for h in hs))
    got_texts = asyncio.run(both())
    assert all(h.done for h in hs) and got_texts == [h.text for h in hs] and all(got_texts)
    done, got = threading.Event(), []
    r = pool.submit(PROMPTS[0], greedy(), on_chunk=lambda c: got.append(c.text),
                    on_done=lambda r: done.set())
    assert done.wait(60) and got and "".join(got) == r.text


def test_model_loaded_once(pool, model, reference):
    _, one_context_kb = reference
    assert all(e.model is model for e in pool.engines)
    model_kb = os.path.getsize(model.path) // 1024
    # two contexts, not a second copy of the weights (mapped and repacked: ~250 MB here)
    assert pool.rss_growth_kb < 2 * one_context_kb + 40 * 1024, (pool.rss_growth_kb, one_context_kb)
    assert pool.rss_growth_kb < model_kb // 2


def test_slot_ids_run_across_engines(pool):
    info = pool.slots_info()
    assert [(s["id"], s["engine"]) for s in info] == [(0, 0), (1, 1)]
    assert all(s["seq_id"] == 1 for s in info)  # each engine's own sequence numbers
    with pytest.raises(ValueError, match="slot must be in 0..1"):
        pool.submit("hi", greedy(slot=2))


def test_dispatch_follows_the_cached_prefix(pool):
    idle(pool)
    first = pool.submit(LONG + "Assistant:\n", greedy(8, slot=1))  # engine 1 holds it after
    first.result(60)
    assert pool.engine_of(first.slot_id) == 1
    idle(pool)
    n_cache = pool.n_dispatched_cache
    # Both engines are idle, so least-loaded would say engine 0; the cache says engine 1.
    h = pool.submit(LONG + "User:\nWhat was in the bottle?\nAssistant:\n", greedy(4))
    h.result(60)
    assert pool.engine_of(h.slot_id) == 1
    assert pool.n_dispatched_cache == n_cache + 1
    shared = common_prefix(first.prompt_tokens, h.prompt_tokens)
    assert shared > 30 and h.n_cached_tokens == shared  # decoded only what differs


def test_least_loaded_otherwise(pool):
    idle(pool)
    n_load = pool.n_dispatched_load
    busy = pool.submit("Count: 1, 2, 3,", greedy(200, slot=0))
    try:
        while pool.engines[0].n_busy == 0 and not busy.done:
            threading.Event().wait(0.01)
        h = pool.submit("Zebras live in", greedy(4))
        h.result(60)
        assert pool.engine_of(h.slot_id) == 1  # engine 0 is busy
    finally:
        busy.cancel()
    busy.wait(30)
    idle(pool)
    h = pool.submit("Owls hunt at", greedy(4))  # no useful prefix anywhere, both idle: the first
    h.result(60)
    assert pool.engine_of(h.slot_id) == 0
    assert pool.n_dispatched_load == n_load + 2


def test_embeddings_refused_without_config(pool):
    assert pool.embedder is None
    with pytest.raises(RuntimeError, match="no embeddings"):
        pool.embed("hello")


# -- CPU sets -------------------------------------------------------------------------------

def test_cpu_mask_parsing():
    assert cpuset.parse_cpu_mask("0x3") == (0, 1)
    assert cpuset.parse_cpu_mask("A") == (1, 3)
    assert cpuset.parse_cpu_mask("0xF0") == (4, 5, 6, 7)
    assert cpuset.parse_cpu_mask("1" + "0" * 8) == (32,)
    for bad in ("", "0x", "0xg", "0x0", "-1", "1_0", " 1"):
        with pytest.raises(ValueError):
            cpuset.parse_cpu_mask(bad)


def test_cpu_range_parsing_and_split():
    assert cpuset.parse_cpu_range("0-3") == (0, 1, 2, 3)
    assert cpuset.parse_cpu_range("-1") == (0, 1)
    assert cpuset.parse_cpu_range("510-") == (510, 511)
    for bad in ("3", "3-1", "0-512", "a-b"):
        with pytest.raises(ValueError):
            cpuset.parse_cpu_range(bad)
    assert cpuset.union((0, 1), cpuset.parse_cpu_range("4-5")) == (0, 1, 4, 5)
    assert cpuset.split_cpus(range(5), 2) == [(0, 1, 2), (3, 4)]
    assert cpuset.split_cpus((0, 1), 4) == [(0,), (1,), (0,), (1,)]
    assert cpuset.split_cpus((), 3) == [(), (), ()]
    assert cpuset.format_cpus((0, 1, 2, 5)) == "0-2,5"


def test_cpu_set_pins_the_context_threads(model):
    """The set reaches ggml (its pool threads, or with OpenMP the team's, run on it) and the
    decoding thread; the thread that made the context keeps its own CPUs. Checked on whichever
    build is loaded (LLAMA_LIB_DIR)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    mine = os.sched_getaffinity(0)
    tids = set(os.listdir("/proc/self/task"))
    ctx = Context(model, ContextParams(n_ctx=256, n_threads=2, n_threads_batch=2, cpumask=(1,)))
    try:
        assert ctx.threadpool_attached  # on an OpenMP build too: the set needs a pool
        assert os.sched_getaffinity(0) == mine
        seen = {}

        def decode():
            with Batch(8, 1) as b:
                b.add_sequence(np.array([2, 3, 4], np.int32), 0, 0)
                assert ctx.decode(b.view()) == 0
            seen["cpus"] = os.sched_getaffinity(0)
            seen["tasks"] = {t: os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")
                             if t not in tids and int(t) != threading.get_native_id()}

        t = threading.Thread(target=decode)
        t.start()
        t.join()
        assert seen["cpus"] == {1}
        # the second compute thread: ggml's pool worker, or with OpenMP the team's thread
        assert seen["tasks"] and all(c == {1} for c in seen["tasks"].values()), seen["tasks"]
    finally:
        ctx.close()
    with pytest.raises(ValueError, match="thread pool"):
        Context(model, ContextParams(n_ctx=256, cpumask=(0,), threadpool=False))


def test_pool_params_carry_the_mask(library):
    g = library.ggml
    plain = g.ggml_threadpool_params_default(2)
    pinned = g.ggml_threadpool_params_default(2)
    cpuset.fill_mask(pinned.cpumask, (1,))
    assert list(pinned.cpumask[:3]) == [False, True, False]
    assert not g.ggml_threadpool_params_match(ctypes.byref(plain), ctypes.byref(pinned))


# -- the server -----------------------------------------------------------------------------

def test_server_with_two_engines(tmp_path):
    srv = ServerProcess(["--engines", "2", "-np", "2", "-c", "512", "-t", "1", "-C", "0x3",
                         "--temp", "0"], tmp_path / "server.log")
    try:
        srv.wait_ready()
        body = {"prompt": PROMPTS[0], "n_predict": 8, "cache_prompt": False}
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            answers = list(ex.map(lambda _: srv.post("/completion", body), range(2)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert len({r.json()["content"] for r in answers}) == 1  # the same greedy text on both
        assert sorted(r.json()["id_slot"] for r in answers) == [0, 1]
        slots = srv.get("/slots").json()
        assert [(s["id"], s["engine"]) for s in slots] == [(0, 0), (1, 1)]
        props = srv.get("/props").json()
        assert props["n_engines"] == 2 and props["total_slots"] == 2
        assert "2 context(s)" in srv.log_path.read_text()
    finally:
        srv.stop()


@pytest.mark.parametrize("argv, message", [
    (["--engines", "2", "-np", "1"], "--engines 2 needs at least as many slots"),
    (["--engines", "0"], "--engines must be >= 1"),
    (["-C", "0xzz"], "not hexadecimal"),
    (["-Crb", "5-2"], "is empty"),
    (["--cpu-strict", "yes"], "expected 0 or 1"),
    (["-C", "0x3", "--no-threadpool"], "applied through a ggml thread pool"),
])
def test_bad_flags_exit_with_a_message(argv, message):
    r = subprocess.run([sys.executable, "-m", "server", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr
