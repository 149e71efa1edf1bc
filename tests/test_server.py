"""The HTTP server (`python -m server`) end to end: a real server process with the default model.

Two servers: `srv` (-np 2, -c 4096, --metrics) for the API, and `locked` (--api-key, --path,
-np 1, --max-queue 1, --no-slots) for auth, static files, a full queue and shutdown.
Greedy sampling (temperature 0) and small n_predict keep it short on two cores.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from chromium_util import Chromium, find_chromium
from server_util import ROOT, raw_request, served

THREADS = os.environ.get("TEST_THREADS", "2")
PROMPT = "User: What is the capital of France?\nAssistant:"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with served(["-np", "2", "-c", "4096", "-t", THREADS, "-tb", THREADS, "--metrics",
                 "-a", "test-model"], log, show_log=True) as s:
        yield s


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("static")
    site = base / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><body>SITE OK</body></html>")
    (site / "sub").mkdir()
    (site / "sub" / "a.txt").write_text("sub file")
    (base / "secret.txt").write_text("TOP SECRET")
    os.symlink(base / "secret.txt", site / "link.txt")
    return site


@pytest.fixture(scope="module")
def locked(tmp_path_factory, site):
    log = tmp_path_factory.mktemp("locked") / "server.log"
    with served(["-np", "1", "-c", "1024", "-t", THREADS, "--api-key", KEY, "--path", str(site),
                 "--max-queue", "1", "--no-slots", "-to", "30", "--drain-delay", "0", "--drain-timeout", "0"],
                log, api_key=KEY) as s:
        yield s


def completion(srv, prompt=PROMPT, **kw) -> dict:
    body = {"prompt": prompt, "n_predict": 16, "temperature": 0, **kw}
    r = srv.post("/completion", body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: requests.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == type_ and isinstance(err["message"], str)
    return err


# -- info endpoints ---------------------------------------------------------------------------

def test_health_props_models(srv):
    r = srv.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "Python" not in r.headers.get("Server", "")
    p = srv.get("/props").json()
    assert p["total_slots"] == 2
    assert p["default_generation_settings"]["n_ctx"] == 2048  # -c 4096 split over 2 slots
    assert p["model_alias"] == "test-model"
    assert p["user_name"] and p["assistant_name"]
    assert p["endpoint_metrics"] is True and p["endpoint_slots"] is True
    for path in ("/v1/models", "/models"):
        m = srv.get(path).json()
        assert m["object"] == "list" and m["data"][0]["id"] == "test-model"
        assert m["data"][0]["object"] == "model" and m["data"][0]["meta"]["n_ctx_train"] == 32768


def test_slots_and_metrics(srv):
    slots = srv.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1]
    for s in slots:
        assert s["n_ctx"] == 2048 and s["is_processing"] is False and "next_token" in s
    completion(srv, n_predict=4)
    r = srv.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split()
            values[k] = float(v)
    for name in ("prompt_tokens_total", "tokens_predicted_total", "prompt_seconds_total",
                 "tokens_predicted_seconds_total", "n_decode_total", "n_busy_slots_per_decode",
                 "prompt_tokens_seconds", "predicted_tokens_seconds", "requests_processing",
                 "requests_deferred"):
        assert f"llamacpp:{name}" in values, name
    assert values["llamacpp:tokens_predicted_total"] >= 4
    assert values["llamacpp:n_decode_total"] >= 1


def test_tokenize_detokenize(srv):
    r = srv.post("/tokenize", {"content": "Hello world"}).json()
    toks = r["tokens"]
    assert toks and all(isinstance(t, int) for t in toks)
    r = srv.post("/tokenize", {"content": "Hello world", "with_pieces": True}).json()
    assert [t["id"] for t in r["tokens"]] == toks
    assert "".join(t["piece"] for t in r["tokens"]) == "Hello world"
    assert srv.post("/tokenize", {"content": "Hi", "add_special": True}).json()["tokens"][0] == 2  # BOS
    assert srv.post("/detokenize", {"tokens": toks}).json() == {"content": "Hello world"}
    assert_error(srv.post("/detokenize", {"tokens": [10**9]}), 400, "invalid_request_error")


# -- generation ---------------------------------------------------------------------------------

def test_completion_shape(srv):
    c = completion(srv, n_predict=8)
    assert c["stop"] is True and isinstance(c["content"], str) and c["content"]
    assert c["stop_type"] in ("eos", "word", "limit")
    assert c["tokens_predicted"] <= 8 and c["tokens_evaluated"] > 5
    assert c["model"] == "test-model" and c["id_slot"] in (0, 1)
    t = c["timings"]
    for k in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"):
        assert k in t
    assert t["predicted_n"] == c["tokens_predicted"]
    assert c["generation_settings"]["temperature"] == 0
    assert srv.post("/completions", {"prompt": PROMPT, "n_predict": 8, "temperature": 0}).json()["content"] == c["content"]


def test_stream_equals_nonstream_completion(srv):
    full = completion(srv, n_predict=16, ignore_eos=True)
    events = srv.stream("/completion", {"prompt": PROMPT, "n_predict": 16, "temperature": 0, "ignore_eos": True})
    *chunks, last = events
    assert all(e["stop"] is False and "content" in e for e in chunks)
    assert last["stop"] is True and last["content"] == "" and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == 16 == full["tokens_predicted"]
    assert "".join(e["content"] for e in chunks) == full["content"]
    assert sum(len(e["tokens"]) for e in chunks) == 16


def test_openai_completions_stream_and_not(srv):
    body = {"model": "x", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "seed": 1}
    r = srv.post("/v1/completions", body)
    assert r.status_code == 200
    c = json.loads(r.text)  # plain json, the way the OpenAI SDK reads it
    assert c["object"] == "text_completion" and c["id"].startswith("cmpl-")
    assert isinstance(c["created"], int) and c["model"] == "test-model"
    ch = c["choices"][0]
    assert ch["index"] == 0 and isinstance(ch["text"], str) and ch["finish_reason"] in ("stop", "length")
    u = c["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 12

    events = srv.stream("/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({e["id"] for e in chunks}) == 1
    assert all(e["object"] == "text_completion" for e in chunks)
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == ch["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] == u["completion_tokens"]
    assert "".join(e["choices"][0]["text"] for e in chunks) == ch["text"]


def test_openai_chat_stream_and_not(srv):
    body = {"model": "x", "messages": [{"role": "system", "content": "You answer briefly."},
                                       {"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0}
    r = srv.post("/v1/chat/completions", body)
    assert r.status_code == 200
    c = json.loads(r.text)
    assert c["object"] == "chat.completion" and c["id"].startswith("chatcmpl-")
    msg = c["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert "User:" not in msg["content"]  # the transcript fallback stops at the next turn
    assert c["choices"][0]["finish_reason"] in ("stop", "length")
    assert c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]

    events = srv.stream("/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == c["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in chunks)
    assert text == msg["content"]


def test_openai_params_and_n(srv):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
            "min_p": 0.1, "seed": 42, "stop": "\n", "logit_bias": {"1": -100}, "repeat_penalty": 1.1}
    a = srv.post("/v1/completions", body).json()
    b = srv.post("/v1/completions", {**body, "logit_bias": [[1, False]]}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # same seed, same bias
    two = srv.post("/v1/completions", {**body, "n": 2}).json()  # n up to --parallel (2 here)
    assert sorted(c["index"] for c in two["choices"]) == [0, 1]
    assert 2 <= two["usage"]["completion_tokens"] <= 8 and two["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
    assert_error(srv.post("/v1/completions", {**body, "n": 3}), 400, "invalid_request_error")
    assert_error(srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}),
                 400, "invalid_request_error")


def test_stop_string_not_emitted(srv):
    base = completion(srv, n_predict=16, ignore_eos=True)["content"]
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    c = completion(srv, n_predict=16, ignore_eos=True, stop=[stop])
    assert c["stop_type"] == "word" and c["stopping_word"] == stop
    assert c["content"] == base[:base.index(stop)]
    assert stop not in c["content"]
    # streamed: the stop string never shows up in any chunk
    events = srv.stream("/completion", {"prompt": PROMPT, "n_predict": 16, "temperature": 0,
                                        "ignore_eos": True, "stop": [stop]})
    assert "".join(e["content"] for e in events) == c["content"]


def test_queueing_more_requests_than_slots(srv):
    n = 5  # 2 slots: 3 wait in the engine's queue, none is refused
    results = [None] * n

    def one(i):
        results[i] = requests.post(srv.url + "/completion", timeout=300, json={
            "prompt": f"User: Count to {i + 3}.\nAssistant:", "n_predict": 8, "temperature": 0,
            "ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.status_code == 200, r.text
        assert r.json()["tokens_predicted"] == 8
    assert {r.json()["id_slot"] for r in results} <= {0, 1}


def test_client_disconnect_frees_slot(srv):
    r = requests.post(srv.url + "/completion", stream=True, timeout=60, json={
        "prompt": PROMPT, "n_predict": 1000, "temperature": 0, "ignore_eos": True, "stream": True})
    assert r.status_code == 200
    lines = r.iter_lines()
    got = 0
    for line in lines:
        if line.startswith(b"data: "):
            got += 1
            if got == 2:
                break
    assert any(s["is_processing"] for s in srv.get("/slots").json())
    r.close()  # vanish mid-stream: the socket is closed under the server
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        slots = srv.get("/slots").json()
        if not any(s["is_processing"] for s in slots):
            break
        time.sleep(0.05)
    assert not any(s["is_processing"] for s in slots), slots
    # the cancelled request's slot is back to (only) the shared system prompt; the others may
    # keep a finished request's tokens as their prompt cache, and every slot's KV holds exactly
    # what the slot accounts for
    assert any(s["n_past"] == s["n_system_tokens"] for s in slots), slots
    assert all(s["kv_pos_max"] == s["n_past"] - 1 for s in slots), slots
    assert completion(srv, n_predict=2)["tokens_predicted"] >= 1  # and it still serves


def test_system_prompt_and_anti_prompt_replacement(srv):
    system = ("Transcript of a dialog, where the User interacts with an Assistant. The Assistant "
              "answers in one short sentence.\n\n")
    try:
        c = completion(srv, prompt="User: Hello\nAssistant:", n_predict=32, system_prompt=system,
                       anti_prompt="User:", assistant_name="Assistant:")
        assert "User:" not in c["content"]
        props = srv.get("/props").json()
        assert props["system_prompt"] == system
        assert props["user_name"] == "User:" and props["anti_prompt"] == ["User:"]
        n_sys = props["n_system_prompt_tokens"]
        assert n_sys > 10
        # following requests continue the new system prompt (reused from the cache)...
        c2 = completion(srv, prompt="User: Hello\nAssistant:", n_predict=32, cache_prompt=False)
        assert c2["timings"]["cache_n"] == n_sys
        assert c2["tokens_evaluated"] == n_sys + c2["timings"]["prompt_n"]
        # ... and stop at the anti-prompt without emitting it
        assert "User:" not in c2["content"]
        if c2["stop_type"] == "word":
            assert c2["stopping_word"] == "User:"
        # the base model, greedy, writes the next "User:" turn within 64 tokens without it
        r = completion(srv, prompt="User: Hello\nAssistant:", n_predict=64, stop=["User:"])
        assert r["stop_type"] == "word"
        assert {s["n_system_tokens"] for s in srv.get("/slots").json()} == {n_sys}
    finally:
        completion(srv, prompt="x", n_predict=1, system_prompt="", anti_prompt="", assistant_name="Assistant:")
    props = srv.get("/props").json()
    assert props["system_prompt"] == "" and props["anti_prompt"] == []
    assert completion(srv, n_predict=2, cache_prompt=False)["timings"]["cache_n"] == 0  # no system prompt


# -- errors -----------------------------------------------------------------------------------

def test_error_statuses(srv):
    url = srv.url
    r = requests.post(url + "/completion", data=b"{not json", timeout=30)
    assert_error(r, 400, "invalid_request_error")
    assert_error(requests.post(url + "/completion", data=b"[1, 2]", timeout=30), 400, "invalid_request_error")
    assert_error(requests.post(url + "/completion", data=b"\xff\xfe", timeout=30), 400, "invalid_request_error")
    for bad in ({"prompt": 3}, {"prompt": "a", "n_predict": "5"}, {"prompt": "a", "temperature": -1},
                {"prompt": "a", "n_predict": -5}, {"prompt": "a", "stop": [1]}, {"prompt": [1, 2, 10**9]},
                {"prompt": "a", "logit_bias": {"abc": "x"}}, {"prompt": "a", "top_p": 2},
                {"prompt": [[1], []]}, {}, {"prompt": "a", "stream": "yes"}):
        assert_error(srv.post("/completion", bad), 400, "invalid_request_error")
    assert_error(srv.post("/v1/chat/completions", {"messages": "hi"}), 400, "invalid_request_error")
    assert_error(srv.post("/v1/chat/completions", {"messages": [{"content": "no role"}]}), 400, "invalid_request_error")
    assert_error(srv.get("/no/such/path"), 404, "not_found_error")
    assert_error(srv.post("/no/such/path", {}), 404, "not_found_error")
    r = srv.get("/completion")
    assert_error(r, 405, "invalid_request_error")
    assert r.headers["Allow"] == "POST"
    assert_error(requests.delete(url + "/v1/chat/completions", timeout=30), 405, "invalid_request_error")
    assert_error(srv.post("/health", {}), 405, "invalid_request_error")
    # too long for a slot (2048 tokens)
    err = assert_error(srv.post("/completion", {"prompt": "hello " * 3000, "n_predict": 1}),
                       400, "exceed_context_size_error")
    assert err["n_prompt_tokens"] > 2048 and err["n_ctx"] == 2048
    # a body over the limit is refused before it is read
    status, body = raw_request(srv.port, b"POST /completion HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{")
    assert status == 413 and json.loads(body)["error"]["code"] == 413
    status, body = raw_request(srv.port, b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert status == 400
    status, body = raw_request(srv.port, b"BREW /completion HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 501 and json.loads(body)["error"]["type"] == "not_supported_error"
    status, body = raw_request(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == 431
    # still serving
    assert srv.get("/health").status_code == 200
    assert completion(srv, n_predict=2)["stop"] is True


# -- the chat page ------------------------------------------------------------------------------

def test_chat_page_served(srv):
    r = srv.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "v1/chat/completions" in r.text and "<script" in r.text
    assert "https://" not in r.text and "http://" not in r.text  # no CDN, nothing external


def test_chat_page_streams_in_headless_chromium(srv, tmp_path):
    chromium = find_chromium()
    if not chromium:
        print("SKIP reason: chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    expected = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                 "max_tokens": 8, "temperature": 0}).json()
    expected_text = expected["choices"][0]["message"]["content"]
    browser = Chromium(chromium, str(tmp_path / "profile"))
    try:
        browser.open(srv.url + "/?q=Hello&temperature=0&max_tokens=8")
        browser.wait_for("document.body.dataset.state === 'done'", timeout=120)
        answer = browser.eval("document.querySelector('#answer-1 .text').textContent")
        user = browser.eval("document.querySelector('.msg.user .text').textContent")
        n_msgs = browser.eval("document.querySelectorAll('.msg').length")
    finally:
        browser.close()
    assert user == "Hello" and n_msgs == 2
    assert "[error" not in answer
    assert answer == expected_text and answer.strip()


# -- the locked-down server: API key, --path, full queue, --no-slots, shutdown ------------------

def test_api_key(locked):
    url = locked.url
    assert requests.get(url + "/health", timeout=30).status_code == 200  # open
    assert_error(requests.get(url + "/props", timeout=30), 401, "authentication_error")
    assert_error(requests.get(url + "/props", headers={"Authorization": "Bearer wrong"}, timeout=30),
                 401, "authentication_error")
    assert_error(requests.post(url + "/completion", json={"prompt": "a"}, timeout=30), 401, "authentication_error")
    assert_error(requests.get(url + "/index.html", timeout=30), 401, "authentication_error")
    assert requests.get(url + "/props", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    assert requests.get(url + "/v1/models", headers={"X-Api-Key": KEY}, timeout=30).status_code == 200
    r = requests.post(url + "/v1/completions", headers={"X-Api-Key": KEY}, timeout=120,
                      json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_no_slots_no_metrics(locked):
    assert_error(locked.get("/slots"), 501, "not_supported_error")
    assert_error(locked.get("/metrics"), 501, "not_supported_error")


def test_static_path_no_way_out(locked):
    h = locked.headers()
    assert "SITE OK" in locked.get("/").text
    assert "SITE OK" in locked.get("/index.html").text
    assert locked.get("/sub/a.txt").text == "sub file"
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/sub/../../secret.txt",
                 "/..%2fsecret.txt", "/sub/%2e%2e/%2e%2e/secret.txt", "/link.txt", "/..\\secret.txt",
                 "/%00", "/nope.html", "//etc/passwd", "/%2fetc%2fpasswd"):
        conn = http.client.HTTPConnection("127.0.0.1", locked.port, timeout=30)
        conn.request("GET", path, headers=h)  # sent as is, no client-side normalisation
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 404, (path, resp.status)
        assert b"TOP SECRET" not in body and b"root:" not in body


def test_queue_full_gets_503(locked):
    body = {"prompt": PROMPT, "n_predict": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    a = requests.post(locked.url + "/completion", json=body, headers=locked.headers(), stream=True, timeout=60)
    try:
        assert a.status_code == 200
        lines = a.iter_lines()  # kept: a dropped requests generator closes the connection
        next(line for line in lines if line.startswith(b"data: "))  # a holds the one slot
        b = requests.post(locked.url + "/completion", json=body, headers=locked.headers(), stream=True, timeout=60)
        try:
            assert b.status_code == 200  # b waits in the queue (max 1)
            r = locked.post("/completion", {"prompt": PROMPT, "n_predict": 1})
            assert_error(r, 503, "unavailable_error")
            assert r.headers.get("Retry-After")
        finally:
            b.close()
    finally:
        a.close()
    # both clients left: the server notices at their next token and takes requests again
    deadline = time.monotonic() + 60
    while True:
        r = locked.post("/completion", {"prompt": PROMPT, "n_predict": 1})
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(float(r.headers.get("Retry-After", "1")))
    assert r.status_code == 200, r.text


def test_bad_flags_exit_2():
    for args in (["--bogus"], ["-np"], ["-c", "abc"], ["--chat-template", "no-such-template"]):
        p = subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert "usage:" in p.stderr


def test_sigterm_ends_streams_and_exits_0(locked):
    """Last: SIGTERM while a client streams: the stream gets a final event, the process exits 0."""
    body = {"prompt": PROMPT, "n_predict": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    r = requests.post(locked.url + "/completion", json=body, headers=locked.headers(), stream=True, timeout=60)
    assert r.status_code == 200
    events = []
    t0 = None
    for line in r.iter_lines():
        if not line.startswith(b"data: "):
            continue
        events.append(json.loads(line[6:]))
        if len(events) == 2:
            locked.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
    print(len(events), time.monotonic() - t0, events[-1].get("tokens_predicted"), locked.log_tail(8))
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "none"
    assert events[-1]["tokens_predicted"] < 400
    assert locked.proc.wait(30) == 0
    print(f"shutdown took {time.monotonic() - t0:.2f} s")
    assert "stopped in" in locked.log_tail()
