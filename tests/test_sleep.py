"""--sleep-idle-seconds in single-model mode: the model, its contexts and KV are freed after the
idle time (RSS drops), the read-only endpoints answer without waking it, /props says
is_sleeping, and the next request loads it again and is answered."""

from __future__ import annotations

import time

import pytest

from server_util import ServerProcess, proc_rss_kb

IDLE_S = 3  # long enough that a loaded box reads "awake" figures before it sleeps


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(["--sleep-idle-seconds", str(IDLE_S), "-np", "2", "-c", "1024", "-t", "2",
                       "--metrics", "--embedding", "--pooling", "mean"],
                      tmp_path_factory.mktemp("sleep") / "server.log")
    s.wait_ready()
    yield s
    s.stop()


def sleeping(srv) -> bool:
    r = srv.get("/props")
    assert r.status_code == 200
    return r.json()["is_sleeping"]


def wait_asleep(srv, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not sleeping(srv):
        assert time.monotonic() < deadline, "the server did not fall asleep"
        time.sleep(0.1)


def completion(srv) -> dict:
    r = srv.post("/completion", {"prompt": "User: Hello\nAssistant:", "n_predict": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def metric(text: str, name: str) -> float:
    rows = [ln.split()[1] for ln in text.splitlines() if ln.startswith(f"llamacpp:{name} ")]
    assert len(rows) == 1, name
    return float(rows[0])


def test_sleep_frees_memory_and_wakes(srv):
    awake = completion(srv)
    rss_awake = proc_rss_kb(srv.proc.pid)
    # the first scrape reports the completion's throughput and starts a new window, empty in
    # the second one; the copy kept on falling asleep has that empty window too
    assert metric(srv.get("/metrics").text, "predicted_tokens_seconds") > 0
    metrics_awake = srv.get("/metrics").text
    assert metric(metrics_awake, "predicted_tokens_seconds") == 0
    assert metric(metrics_awake, "tokens_predicted_total") >= 4
    wait_asleep(srv)
    rss_asleep = proc_rss_kb(srv.proc.pid)
    # the model (~250 MB mapped, partly touched) and the KV buffers are gone
    assert rss_asleep < rss_awake - 100_000, (rss_awake, rss_asleep)
    # the read-only endpoints answer from what was kept, and do not wake it
    assert srv.get("/health").status_code == 200
    models = srv.get("/models").json()
    assert len(models["data"]) == 1 and models["data"][0]["meta"]["n_vocab"] > 0
    assert srv.get("/metrics").text == metrics_awake
    assert srv.get("/v1/models").status_code == 200
    assert sleeping(srv)
    # a generation wakes it, and answers as before (greedy)
    t0 = time.monotonic()
    again = completion(srv)
    wake_s = time.monotonic() - t0
    assert again["content"] == awake["content"]
    assert not sleeping(srv)
    assert proc_rss_kb(srv.proc.pid) > rss_asleep + 100_000
    print(f"RSS awake {rss_awake / 1024:.0f} MiB, asleep {rss_asleep / 1024:.0f} MiB; "
          f"the waking request took {wake_s:.2f} s")


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/tokenize", {"content": "Hello"}),
    ("POST", "/v1/embeddings", {"input": "Hello"}),
    ("POST", "/v1/chat/completions/input_tokens", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_model_endpoints_wake_it(srv, method, path, body):
    wait_asleep(srv)
    r = srv.post(path, body)
    assert r.status_code == 200, r.text
    assert not sleeping(srv)


def test_metrics_window_across_sleep(srv):
    """llama-server's windowed throughput gauges: the window of the last work before sleeping is
    reported by the first scrape while asleep, then empty, and still empty after waking."""
    completion(srv)
    wait_asleep(srv)
    first = srv.get("/metrics").text
    assert metric(first, "predicted_tokens_seconds") > 0 and metric(first, "prompt_tokens_seconds") > 0
    second = srv.get("/metrics").text
    assert metric(second, "predicted_tokens_seconds") == 0 and metric(second, "prompt_tokens_seconds") == 0
    assert metric(second, "tokens_predicted_total") == metric(first, "tokens_predicted_total")
    assert sleeping(srv)
    assert srv.post("/tokenize", {"content": "Hello"}).status_code == 200  # wakes it
    assert not sleeping(srv)
    assert metric(srv.get("/metrics").text, "predicted_tokens_seconds") == 0


def test_streams_wake_it_and_keep_it_awake(srv):
    wait_asleep(srv)
    events = srv.stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 3})
    assert events[-1] == "[DONE]"
    assert not sleeping(srv)
    assert "sleeping after" in srv.log_tail(200) and "woke up" in srv.log_tail(200)


def test_router_children_sleep_and_wake(tmp_path):
    """--sleep-idle-seconds goes down to each model's child: /models says "sleeping" (the child
    tells the router), and a request wakes it."""
    from tiny_model import linked_default
    models = tmp_path / "models"
    models.mkdir()
    linked_default(models, "gemma")
    r = ServerProcess(["--models-dir", str(models), "--sleep-idle-seconds", str(IDLE_S),
                       "-c", "512", "-np", "1", "-t", "2"], tmp_path / "router.log")
    try:
        r.wait_ready()

        def status():
            return r.get("/models").json()["data"][0]["status"]["value"]

        assert r.post("/completion", {"model": "gemma", "prompt": "Hi", "n_predict": 2}).status_code == 200
        deadline = time.monotonic() + 20
        while status() != "sleeping":
            assert time.monotonic() < deadline, status()
            time.sleep(0.1)
        assert r.get("/props?model=gemma").json()["is_sleeping"]  # answered without waking it
        assert status() == "sleeping"
        assert r.post("/completion", {"model": "gemma", "prompt": "Hi", "n_predict": 2}).status_code == 200
        assert status() == "loaded"
    finally:
        r.stop()
