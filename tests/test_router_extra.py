"""Router mode, ours beyond llama-server: the cores split between busy models' children
(server.router.cores), prompt caches kept across an unload (server.saved_cache); and
llama-server's GET /models?reload=1 (the models folder read again)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import requests

from server_util import ServerProcess
from tiny_model import models_folder, tiny_model

N_CPUS = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    d = tmp_path_factory.mktemp("router-cores")
    models = models_folder(d)
    s = ServerProcess(["--models-dir", str(models), "-c", "1024", "-np", "2", "-t", str(N_CPUS),
                       "--models-max", "2"], d / "router.log")
    s.wait_ready()
    s.models = models
    yield s
    s.stop()


def share(s, model: str) -> dict:
    r = s.get(f"/props?model={model}")
    assert r.status_code == 200, r.text
    return r.json()["cpu_share"] or {}


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Stream(threading.Thread):
    """A long streamed completion read in a thread until `close()`."""

    def __init__(self, s, model: str, n_predict: int):
        super().__init__(daemon=True)
        self.r = requests.post(s.url + "/completion", stream=True, timeout=300, json={
            "model": model, "prompt": "User: Tell me a long story.\nAssistant:", "n_predict": n_predict,
            "ignore_eos": True, "stream": True, "temperature": 0})
        assert self.r.status_code == 200
        self.n = 0
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for line in self.r.iter_lines():
                self.n += line.startswith(b"data:")
                if self.stop.is_set():
                    break
        except requests.RequestException:
            pass
        self.r.close()

    def close(self) -> None:
        self.stop.set()
        self.join(30)


@pytest.mark.skipif(N_CPUS < 2, reason="needs two CPUs to split")
def test_busy_models_get_disjoint_cores_and_a_lone_one_all(router):
    everything = sorted(os.sched_getaffinity(0))
    long_a = Stream(router, "gemma", 4000)
    long_b = Stream(router, "tiny", 100000)
    try:
        def both_split():
            a, b = share(router, "gemma"), share(router, "tiny")
            assert long_a.is_alive() and long_b.is_alive()
            return (a, b) if a.get("n_threads") == b.get("n_threads") == N_CPUS // 2 else None
        a, b = wait_for(both_split, "two busy models did not get half the cores each")

        def cpus(text):
            return {c for part in text.split(",") for c in
                    range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
        assert not cpus(a["cpus"]) & cpus(b["cpus"]), (a, b)  # disjoint
        assert cpus(a["cpus"]) | cpus(b["cpus"]) == set(everything)
        shown = {m["id"]: m["status"].get("cpus") for m in router.get("/models").json()["data"]}
        assert shown == {"gemma": a["cpus"], "tiny": b["cpus"]}
        long_b.close()  # tiny's client leaves: gemma, alone busy, gets every core back
        full = wait_for(lambda: (x := share(router, "gemma")).get("n_threads") == N_CPUS and x,
                        "the busy model did not get the cores back")
        assert cpus(full["cpus"]) == set(everything)
    finally:
        long_a.close()
        long_b.close()


def test_prompt_cache_survives_an_unload(router):
    history = "".join(f"User: Question {i} about the sea and its ships?\nAssistant: Answer {i}.\n"
                      for i in range(12))
    body = {"model": "gemma", "prompt": history + "User: And the last one?\nAssistant:",
            "n_predict": 4, "temperature": 0}
    first = router.post("/completion", body).json()["timings"]
    assert first["prompt_n"] > 150
    assert router.post("/models/unload", {"model": "gemma"}).status_code == 200
    deadline = time.monotonic() + 60
    while next(m for m in router.get("/models").json()["data"] if m["id"] == "gemma")["status"]["value"] != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = router.post("/completion", body).json()["timings"]  # a new child: its cache came back
    assert again["cache_n"] >= first["prompt_n"] - 1, (first, again)
    assert again["prompt_n"] <= 1, (first, again)


def test_reload_reads_the_folder_again(router):
    def ids():
        return {m["id"] for m in router.get("/models?reload=1").json()["data"]}
    assert ids() == {"tiny", "gemma"}
    (router.models / "tiny-b.gguf").symlink_to(tiny_model())
    try:
        assert ids() == {"tiny", "gemma", "tiny-b"}
    finally:
        (router.models / "tiny-b.gguf").unlink()
    assert ids() == {"tiny", "gemma"}
