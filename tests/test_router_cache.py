"""The router's models from the Hugging Face cache (server.router.hf_cache), as llama-server's:
listed as `owner/name:TAG` with source "cache", served like any other, `DELETE /models` stops it
and removes its files (the links of the cache, never the file they point to), the other sources
are not removable, `POST /models` (a download) is refused; and the router's build_info."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import requests

from server.router import hf_cache
from server_util import ServerProcess
from tiny_model import linked_default, tiny_model

COMMIT, OID = "c0ffee" + "0" * 34, "b" * 64


def cache_entry(cache: Path, repo: str, fname: str, target: Path, oid: str = OID) -> Path:
    """Hugging Face's layout: refs/main, snapshots/COMMIT/FILE -> ../../blobs/OID -> target."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    for sub in ("refs", "blobs", f"snapshots/{COMMIT}"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    if not (folder / "blobs" / oid).is_symlink():
        (folder / "blobs" / oid).symlink_to(target)
    (folder / "snapshots" / COMMIT / fname).symlink_to(Path("..") / ".." / "blobs" / oid)
    return folder


def wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_cache_listing_and_removal(tmp_path, monkeypatch):
    """Names and tags as llama.cpp reads them: one entry per tag (a split model by its first
    shard), projectors left out; a removal keeps a blob another entry still links to."""
    target = tmp_path / "weights.bin"
    target.write_bytes(b"GGUF")
    cache = tmp_path / "hub"
    cache_entry(cache, "org/a-GGUF", "a-Q4_K_M.gguf", target)
    cache_entry(cache, "org/a-GGUF", "a-Q8_0-00001-of-00002.gguf", target, "1" * 64)
    cache_entry(cache, "org/a-GGUF", "a-Q8_0-00002-of-00002.gguf", target, "2" * 64)
    cache_entry(cache, "org/a-GGUF", "mmproj-a-F16.gguf", target, "3" * 64)
    cache_entry(cache, "org/b", "b.Q5_K.gguf", target)  # the same blob name in another repo
    (cache / "models--org--norefs" / "snapshots").mkdir(parents=True)
    monkeypatch.setenv("LLAMA_CACHE", str(cache))
    found = hf_cache.cached_models()
    assert sorted(found) == ["org/a-GGUF:Q4_K_M", "org/a-GGUF:Q8_0", "org/b:Q5_K"]
    assert found["org/a-GGUF:Q8_0"].endswith("a-Q8_0-00001-of-00002.gguf")
    assert hf_cache.resolve("org/a-GGUF") == found["org/a-GGUF:Q4_K_M"]  # no tag: Q4_K_M
    assert hf_cache.resolve("org/a-GGUF:q8_0") == found["org/a-GGUF:Q8_0"]
    assert hf_cache.remove("org/a-GGUF:Q8_0")
    blobs = cache / "models--org--a-GGUF" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == sorted([OID, "3" * 64])  # both shards' gone
    assert sorted(hf_cache.cached_models()) == ["org/a-GGUF:Q4_K_M", "org/b:Q5_K"]
    assert not hf_cache.remove("org/a-GGUF:Q8_0")
    assert target.read_bytes() == b"GGUF"  # links removed, never their target


def test_router_serves_and_deletes_a_cached_model(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    tiny = tiny_model()
    folder = cache_entry(cache, "org/tiny-GGUF", "tiny-Q8_0.gguf", tiny)
    models = tmp_path / "models"
    models.mkdir()
    linked_default(models, "gemma")
    monkeypatch.setenv("LLAMA_CACHE", str(cache))
    r = ServerProcess(["--models-dir", str(models), "-c", "512", "-np", "1", "-t", "2"],
                      tmp_path / "router.log")
    name = "org/tiny-GGUF:Q8_0"
    try:
        r.wait_ready()
        listed = {m["id"]: m for m in r.get("/models").json()["data"]}
        assert listed[name]["source"] == "cache" and listed[name]["can_remove"] is True
        assert listed["gemma"]["source"] == "models_dir" and listed["gemma"]["can_remove"] is False
        # llama-server's build tag of the libllama in use, "b<build number>-<commit>"
        assert re.fullmatch(r"b\d+-\w+", r.get("/props").json()["build_info"])
        c = r.post("/completion", {"model": name, "prompt": "Hi", "n_predict": 2})
        assert c.status_code == 200, c.text
        status = {m["id"]: m["status"]["value"] for m in r.get("/models").json()["data"]}
        assert status[name] == "loaded"  # DELETE stops it before removing its files
        assert r.session.delete(r.url + "/models?model=gemma").status_code == 400  # not from the cache
        assert r.session.delete(r.url + "/models?model=nope").status_code == 404
        assert r.post("/models", {"model": "org/other:Q4_0"}).status_code == 501  # no downloads
        assert r.post("/models", {"model": name}).status_code == 400  # already there
        events, subscribed = [], threading.Event()

        def listen():
            with requests.get(r.url + "/models/sse", stream=True, timeout=60) as sse:
                subscribed.set()
                for line in sse.iter_lines():
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
                        if events[-1].get("event") == "model_remove":
                            return
        threading.Thread(target=listen, daemon=True).start()
        assert subscribed.wait(10)  # the model's stop takes longer than the subscription
        d = r.session.delete(r.url + f"/models?model={name}")
        assert d.status_code == 200 and d.json() == {"success": True}
        assert wait_for(lambda: {"model": name, "event": "model_remove"} in events)
        assert name not in {m["id"] for m in r.get("/models").json()["data"]}
        assert not list((folder / "snapshots" / COMMIT).iterdir()) and not list((folder / "blobs").iterdir())
        assert tiny.exists()
        assert r.post("/completion", {"model": name, "prompt": "Hi", "n_predict": 2}).status_code == 400
        assert r.post("/completion", {"model": "gemma", "prompt": "Hi", "n_predict": 2}).status_code == 200
    finally:
        r.stop()
