"""Router mode (--models-dir / --models-preset): requests routed by `model` to the right model
(a tiny random model beside the default one: their answers and embedding sizes differ), /models
and its status, load / unload / autoload, --models-max's least-recently-used unloading, status
events, a model that fails to load or dies kept apart from the others, preset precedence, bad
input and bad preset files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from server_util import ROOT, ServerProcess
from tiny_model import linked_default, models_folder, tiny_model

PRESET = """\
; every model
[*]
n-predict = 7
ctx-size = 4096

[tiny]
alias = small,little
n-predict = 3

[gemma]
load-on-startup = true
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    d = tmp_path_factory.mktemp("router")
    models = models_folder(d)
    linked_default(models, "gemma-b")
    (models / "broken.gguf").write_bytes(b"GGUF but not really")
    (d / "models.ini").write_text(PRESET)
    s = ServerProcess(["--models-dir", str(models), "--models-preset", str(d / "models.ini"),
                       "--models-max", "2", "-c", "512", "-np", "2", "-t", "1",
                       "--embedding", "--pooling", "mean"], d / "router.log")
    s.wait_ready()
    wait_status(s, "gemma", "loaded")  # load-on-startup
    yield s
    s.stop()


def statuses(s) -> dict:
    r = s.get("/models")
    assert r.status_code == 200
    return {m["id"]: m["status"] for m in r.json()["data"]}


def wait_status(s, name: str, want: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = statuses(s)[name]
        if st["value"] == want:
            return st
        assert time.monotonic() < deadline, f"{name}: {st}"
        time.sleep(0.05)


def complete(s, model: str, **kw) -> requests.Response:
    return s.post("/completion", {"model": model, "prompt": "User: Hello\nAssistant:",
                                  "temperature": 0, **kw})


def test_lists_models_with_aliases_and_status(router):
    data = {m["id"]: m for m in router.get("/v1/models").json()["data"]}
    assert set(data) == {"tiny", "gemma", "gemma-b", "broken"}
    assert data["tiny"]["aliases"] == ["small", "little"]
    assert data["gemma"]["status"]["value"] == "loaded"
    props = router.get("/props").json()
    assert props["role"] == "router" and props["max_instances"] == 2 and props["models_autoload"]


def test_routes_by_model_and_alias(router):
    tiny, gemma = complete(router, "tiny", n_predict=6), complete(router, "gemma", n_predict=6)
    assert tiny.status_code == 200 and gemma.status_code == 200, (tiny.text, gemma.text)
    assert tiny.json()["model"] == "tiny" and gemma.json()["model"] == "gemma"
    assert tiny.json()["content"] != gemma.json()["content"]
    again = complete(router, "small", n_predict=6)  # an alias of tiny
    assert again.json()["content"] == tiny.json()["content"]


def test_routes_streams_chat_and_embeddings(router):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    texts = {}
    for model in ("tiny", "gemma"):
        events = router.stream("/v1/chat/completions", {**chat, "model": model})
        assert events[-1] == "[DONE]"
        assert {e["model"] for e in events[:-1]} == {model}
        texts[model] = "".join(e["choices"][0]["delta"].get("content") or ""
                               for e in events[:-1] if e["choices"])
        emb = router.post("/v1/embeddings", {"model": model, "input": "hello"})
        assert emb.status_code == 200, emb.text
        assert len(emb.json()["data"][0]["embedding"]) == (64 if model == "tiny" else 640)
    assert texts["tiny"] != texts["gemma"]
    # GET routes take the model from the query
    assert router.get("/props?model=tiny").json()["model_alias"] == "tiny"
    assert len(router.get("/slots?model=gemma").json()) == 2


def test_preset_precedence(router):
    """command line (-c 512) > the model's section > [*]"""
    for model, n_predict in (("tiny", 3), ("gemma", 7)):
        props = router.get(f"/props?model={model}").json()
        assert props["default_generation_settings"]["n_ctx"] == 256  # -c 512 over 2 slots, not 4096
        assert props["default_generation_settings"]["params"]["n_predict"] == n_predict
    st = statuses(router)["tiny"]
    assert st["args"].index("--n-predict") < st["args"].index("-c")


@pytest.mark.parametrize("path,body,status,shape", [
    ("/completion", {"model": "nope", "prompt": "x"}, 400, "llama"),
    ("/completion", {"prompt": "x"}, 400, "llama"),
    ("/v1/chat/completions", {"model": 3, "messages": []}, 400, "llama"),
    ("/v1/messages", {"model": "nope", "max_tokens": 3, "messages": []}, 400, "anthropic"),
    ("/models/load", {"model": "nope"}, 404, "llama"),
    ("/models/unload", {"model": "gemma-b"}, 400, "llama"),
])
def test_bad_requests(router, path, body, status, shape):
    r = router.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] if shape == "anthropic" else err["code"] == status
    assert router.post("/completion", {"model": "gemma", "prompt": "x", "n_predict": 1}).status_code == 200


def test_failing_model_is_kept_apart(router):
    r = complete(router, "broken", n_predict=2)
    assert r.status_code == 500 and "failed to load" in r.json()["error"]["message"]
    st = statuses(router)["broken"]
    assert st["failed"] and st["exit_code"] == 1 and "could not load the model" in st["error"]
    assert complete(router, "gemma", n_predict=2).status_code == 200


def test_load_unload_events_and_lru(router):
    events, stop = [], threading.Event()

    def listen():
        with requests.get(router.url + "/models/sse", stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
                if stop.is_set():
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    time.sleep(0.3)
    assert complete(router, "tiny", n_predict=1).status_code == 200  # tiny loaded, gemma used before
    complete(router, "gemma", n_predict=1)  # gemma is now the most recently used
    assert router.post("/models/load", {"model": "gemma-b"}).json() == {"success": True}
    wait_status(router, "gemma-b", "loaded")
    st = statuses(router)
    assert st["tiny"]["value"] == "unloaded" and st["gemma"]["value"] == "loaded"  # --models-max 2: LRU out
    assert router.post("/models/unload", {"model": "gemma-b"}).json() == {"success": True}
    wait_status(router, "gemma-b", "unloaded")
    stop.set()
    complete(router, "gemma", n_predict=1)  # an event-free wake-up of the listener's loop
    seen = [(e["model"], e["data"]["status"]) for e in events if e.get("event") == "status_change"]
    for step in (("gemma-b", "loading"), ("tiny", "unloaded"), ("gemma-b", "loaded"), ("gemma-b", "unloaded")):
        assert step in seen, seen
    assert seen.index(("tiny", "unloaded")) < seen.index(("gemma-b", "loaded"))


def test_autoload_off_per_request_and_waiting_while_loading(router):
    if statuses(router)["tiny"]["value"] != "unloaded":
        router.post("/models/unload", {"model": "tiny"})
        wait_status(router, "tiny", "unloaded")
    r = router.post("/completion?autoload=false", {"model": "tiny", "prompt": "x", "n_predict": 1})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is not loaded"
    before = router.log_tail(100000).count("loading model tiny")
    results = []
    threads = [threading.Thread(target=lambda: results.append(complete(router, "tiny", n_predict=2)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 3  # they waited for the one load
    assert router.log_tail(100000).count("loading model tiny") == before + 1  # one load for the three


def test_children_take_only_the_routers_key(router):
    """A child listens on 127.0.0.1, open to every local user: it answers only the router."""
    assert complete(router, "gemma", n_predict=1).status_code == 200
    port = statuses(router)["gemma"]["port"]
    r = requests.post(f"http://127.0.0.1:{port}/completion", json={"prompt": "x", "n_predict": 1}, timeout=30)
    assert r.status_code == 401
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200


def test_child_killed_others_serve_and_it_comes_back(router):
    assert complete(router, "tiny", n_predict=1).status_code == 200
    port = statuses(router)["tiny"]["port"]
    pid = int(subprocess.check_output(["fuser", f"{port}/tcp"], stderr=subprocess.DEVNULL).split()[0]) \
        if os.path.exists("/usr/bin/fuser") else None
    if pid is None:
        pytest.skip("no fuser to find the child")
    os.kill(pid, signal.SIGKILL)  # as a native abort would end it
    st = wait_status(router, "tiny", "unloaded")
    assert st["failed"] and st["exit_code"] == -9
    assert complete(router, "gemma", n_predict=1).status_code == 200
    assert complete(router, "tiny", n_predict=1).status_code == 200  # loaded again on demand


@pytest.mark.parametrize("text,where", [
    ("[a]\nmodel = x.gguf\nno-such-flag = 1\n", ":3"),
    ("[a]\nmodel = x.gguf\nthis is not a key\n", ":3"),
    ("[b]\nctx-size = 1\n", "[b]"),
])
def test_bad_preset_exits_2_with_the_line(tmp_path, text, where):
    p = tmp_path / "bad.ini"
    p.write_text(text)
    r = subprocess.run([sys.executable, "-m", "server", "--models-preset", str(p)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{p}{where}" in r.stderr or where in r.stderr, r.stderr


def test_models_memory_unloads_to_fit_or_refuses(tmp_path):
    """--models-memory (ours): the estimates (GGUF + KV + buffers) of the loaded models stay
    within the limit: the least recently used goes, and a model that cannot fit alone is refused
    with its figure while the others keep serving."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").symlink_to(tiny_model())
    linked_default(models, "gemma")
    linked_default(models, "gemma-b")
    ini = tmp_path / "models.ini"
    ini.write_text(f"[*]\nctx-size = 1024\n\n[gemma-big]\nmodel = {models / 'gemma.gguf'}\nctx-size = 32768\n")
    s = ServerProcess(["--models-dir", str(models), "--models-preset", str(ini), "--models-memory", "700",
                       "-np", "2", "-t", "1"], tmp_path / "router.log")
    try:
        s.wait_ready()
        mem = {m["id"]: m["memory_mib"] for m in s.get("/models").json()["data"]}
        assert 300 < mem["gemma"] == mem["gemma-b"] < 700 < mem["gemma-big"], mem
        assert mem["tiny"] < mem["gemma"]
        assert complete(s, "gemma", n_predict=1).status_code == 200
        assert complete(s, "gemma-b", n_predict=1).status_code == 200  # both do not fit: gemma goes
        assert statuses(s)["gemma"]["value"] == "unloaded"
        assert complete(s, "tiny", n_predict=1).status_code == 200  # fits beside gemma-b
        st = statuses(s)
        assert st["gemma-b"]["value"] == "loaded" and st["tiny"]["value"] == "loaded"
        r = complete(s, "gemma-big", n_predict=1)
        assert r.status_code == 503 and "--models-memory 700 MiB" in r.json()["error"]["message"]
        assert statuses(s)["gemma-big"]["failed"]
        assert complete(s, "tiny", n_predict=1).status_code == 200
    finally:
        s.stop()
