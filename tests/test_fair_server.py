"""Scheduling between users over HTTP (docs/scheduling.md): who is a user (the `user` field,
else the X-User-ID header), per-user queue limits (429 with Retry-After while others get in),
`priority` bounded by --priority-min, preemption with an identical greedy stream, and the
per-user figures in /slots and /metrics. One server, one slot."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import N_THREADS
from server_util import served

PROMPT = "User: Tell me a long story about a dragon and a knight.\nAssistant:"
SHORT = "User: What is the capital of France?\nAssistant:"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("fair") / "server.log"
    t = str(N_THREADS)
    with served(["-np", "1", "-c", "1024", "-t", t, "-tb", t, "--metrics", "--max-queue-per-user", "1",
                 "--priority-min", "-5", "--preempt-after-ms", "0"], log, show_log=True) as s:
        yield s


def body(prompt: str, n: int, **kw) -> dict:
    return {"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True, "cache_prompt": False, **kw}


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def wait_busy(server, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.get("/slots").json()[0]["is_processing"]:
            return
        time.sleep(0.02)
    raise AssertionError("the slot never got busy")


@pytest.mark.parametrize("field, value", [
    ("priority", "high"), ("priority", 1.5), ("priority", -6), ("priority", True),
    ("user", 7), ("user", ""), ("user", "x" * 300), ("user", "a\nb"),
])
def test_bad_priority_or_user_is_a_400(server, field, value):
    r = server.post("/completion", body(SHORT, 1, **{field: value}))
    assert r.status_code == 400 and field in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 1, field: value})
    assert r.status_code == 400 and "error" in r.json()


def test_bad_user_header_is_a_400(server):
    r = server.post("/completion", body(SHORT, 1), headers={"X-User-ID": "y" * 300})
    assert r.status_code == 400 and "X-User-ID" in r.json()["error"]["message"]


def test_a_user_over_its_queue_share_gets_429_others_get_in(server):
    long_a, out = in_thread(lambda: server.post("/completion", body(PROMPT, 64), headers={"X-User-ID": "a"}))
    wait_busy(server)
    queued_a, out2 = in_thread(lambda: server.post("/completion", body(SHORT, 2, user="a")))
    end = time.monotonic() + 30
    while server.get("/slots").json()[0]["scheduling"]["user_waiting"] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    r = server.post("/completion", body(SHORT, 2), headers={"X-User-ID": "a"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    b = server.post("/completion", body(SHORT, 2, user="b"))  # another user still gets in
    assert b.status_code == 200 and b.json()["tokens_predicted"] == 2
    for t in (long_a, queued_a):
        t.join(120)
    assert out[0].status_code == 200 and out2[0].status_code == 200
    metrics = server.get("/metrics").text
    assert 'llamacpp:user_refused_total{user="a"} 1' in metrics


def test_high_priority_preempts_and_the_parked_stream_is_unchanged(server):
    want = server.post("/completion", body(PROMPT, 32)).json()["content"]
    low, out = in_thread(lambda: server.stream("/completion", body(PROMPT, 32, user="batch", priority=3)))
    wait_busy(server)
    time.sleep(0.3)  # some of its tokens are out
    t0 = time.monotonic()
    vip = server.post("/completion", body(SHORT, 4, user="vip", priority=-5))
    assert vip.status_code == 200
    vip_done = time.monotonic() - t0
    slots = server.get("/slots").json()
    low.join(120)
    events = out[0]
    assert "".join(e["content"] for e in events if isinstance(e, dict)) == want
    assert vip_done < 10
    assert slots[0]["scheduling"]["user"] in ("batch", "", None)  # None: idle between the two
    metrics = server.get("/metrics").text
    assert 'llamacpp:user_preemptions_total{user="batch"} 1' in metrics
    assert 'llamacpp:user_requests_started_total{user="vip"} 1' in metrics


def test_schedule_flags_reach_the_engine_config():
    from server.config.cli import parse_args
    from server.config.settings import build_settings
    s = build_settings(parse_args(["--schedule", "fcfs", "--max-queue-per-user", "3", "--priority-min", "-2",
                                   "--preempt-after-ms", "-1", "--user-header", "X-Tenant"]))
    e = s.engine
    assert (e.schedule, e.max_queue_per_user, e.preempt_after_ms) == ("fcfs", 3, -1)
    assert s.defaults.priority_min == -2 and s.user_header == "X-Tenant"
    d = build_settings(parse_args([]))
    assert (d.engine.schedule, d.engine.max_queue_per_user, d.engine.preempt_after_ms) == ("fair", -1, 0)
    assert d.defaults.priority_min == 0 and d.user_header == "X-User-ID"


@pytest.mark.parametrize("argv", [["--schedule", "lifo"], ["--max-queue-per-user", "-2"],
                                  ["--preempt-after-ms", "-5"], ["--user-header", "X User"]])
def test_bad_schedule_flags_exit_2(argv, capsys):
    from server.config.cli import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_anthropic_and_responses_name_their_user(server):
    """/v1/messages' metadata.user_id and /v1/responses' safety_identifier (else user) are the user."""
    msg = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = server.post("/v1/messages", {**msg, "metadata": {"user_id": "claude-7"}})
    assert r.status_code == 200, r.text
    r = server.post("/v1/responses", {"input": "hi", "max_output_tokens": 2, "safety_identifier": "resp-9",
                                      "user": "ignored-when-safety-identifier"})
    assert r.status_code == 200, r.text
    r = server.post("/v1/responses", {"input": "hi", "max_output_tokens": 2, "user": "resp-legacy"})
    assert r.status_code == 200, r.text
    assert server.post("/v1/messages", {**msg, "metadata": {"user_id": 5}}).status_code == 400
    metrics = server.get("/metrics").text
    for who in ("claude-7", "resp-9", "resp-legacy"):
        assert f'llamacpp:user_requests_started_total{{user="{who}"}} 1' in metrics, who
    assert "ignored-when-safety-identifier" not in metrics
