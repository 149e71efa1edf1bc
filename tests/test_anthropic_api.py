"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) judged by the real
`anthropic` SDK against our server on the real model: plain and streamed answers, the cache's
share in usage, a whole tool loop streamed and not, forced tool choices, thinking blocks with
a reasoning template, count_tokens, and bad bodies refused in Anthropic's error shape."""

from __future__ import annotations

import json

import pytest
import requests

from server_util import served, served_with_template

anthropic = pytest.importorskip("anthropic")

KEY = "sk-ant-test"
WEATHER = {"name": "get_weather", "description": "Get the current weather of a city",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string", "maxLength": 40},
                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city"]}}
TIME = {"name": "get_time", "description": "The time in a timezone",
        "input_schema": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                         "required": ["tz"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ONE_CALL = {"type": "any", "disable_parallel_tool_use": True}  # else the model may call until max_tokens
GREEDY = {"temperature": 0}  # sampling fields: this SDK's create() has none, llama-server reads them


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    log = tmp_path_factory.mktemp("anthropic-plain") / "server.log"
    with served(["-np", "2", "-c", "4096", "--api-key", KEY], log, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    with served_with_template(tmp_path_factory, "Qwen-Qwen2.5-7B-Instruct.jinja", ctx=4096) as s:
        yield s


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    with served_with_template(tmp_path_factory, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja") as s:
        yield s


def client(s, key: str = KEY):
    return anthropic.Anthropic(api_key=key, base_url=s.url, max_retries=0, timeout=120)


def raw_events(s, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """A stream's (event name, data) pairs as sent (SDK keywords: extra_body merged)."""
    body = {**{k: v for k, v in body.items() if k != "extra_body"}, **body.get("extra_body", {})}
    out, name = [], None
    with requests.post(s.url + "/v1/messages", json={**body, "stream": True}, stream=True, timeout=120,
                       headers=headers or {}) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                out.append((name, json.loads(line[6:])))
                name = None
    return out


def test_plain_answer_usage_and_count_tokens(plain):
    c = client(plain)
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Say hello to the world"}]}]
    n = c.messages.count_tokens(model="local", system=system, messages=msgs).input_tokens
    m = c.messages.create(model="local", max_tokens=8, system=system, messages=msgs, extra_body=GREEDY,
                          metadata={"user_id": "u1"})
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content and m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and 0 < m.usage.output_tokens <= 8
    # count_tokens is what the request's prompt decodes (or finds in the cache)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == n
    again = c.messages.create(model="local", max_tokens=8, system=system, messages=msgs, extra_body=GREEDY)
    assert again.usage.cache_read_input_tokens >= n - 1 and again.usage.input_tokens <= 1
    assert again.content[0].text == m.content[0].text  # greedy, same prompt, from the cache


def test_stop_sequence(plain):
    m = client(plain).messages.create(model="local", max_tokens=40, extra_body=GREEDY,
                                      messages=[{"role": "user", "content": "Count from 1 to 20: 1, 2, 3,"}],
                                      stop_sequences=["7"])
    if m.stop_reason == "stop_sequence":
        assert m.stop_sequence == "7" and "7" not in m.content[0].text
    else:  # the model never wrote a 7
        assert m.stop_sequence is None


def test_stream_event_order_and_indices(plain):
    body = {"model": "local", "max_tokens": 10, "extra_body": GREEDY,
            "messages": [{"role": "user", "content": "Tell me about the sea"}]}
    events = raw_events(plain, body, {"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    names = [n for n, _ in events]
    assert all(n == d["type"] for n, d in events)  # each event is named as its data's type
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert names[2] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] > 0
    assert all(d["index"] == 0 for _, d in events[2:-2])
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    final = events[-2][1]
    assert final["usage"]["output_tokens"] > 0 and final["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    # the SDK reads the same stream into the same message
    with client(plain).messages.stream(**body) as s:
        kinds = [e.type for e in s]
        msg = s.get_final_message()
    assert msg.content[0].text == text and kinds[0] == "message_start" and kinds[-1] == "message_stop"


def test_auth_in_anthropic_error_shape(plain):
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(plain, "wrong").messages.create(model="local", max_tokens=4, messages=ASK)
    assert e.value.status_code == 401
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    r = requests.post(plain.url + "/v1/messages/count_tokens", json={"messages": ASK},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


BAD = [
    ({"max_tokens": 4}, "messages"),
    ({"max_tokens": 4, "messages": []}, "at least one message"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, "content[0].type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "What is this?"}]}]}, "image input is not supported"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "role"),
    ({"messages": ASK, "tools": [{"description": "no name", "input_schema": {"type": "object"}}]}, "tools[0].name"),
    ({"messages": ASK, "tools": [{"name": "f", "input_schema": "object"}]}, "tools[0].input_schema"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"messages": ASK, "max_tokens": 0}, "max_tokens"),
    ({"messages": ASK, "thinking": {"type": "sometimes"}}, "thinking"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, "tool_use_id"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[n for _, n in BAD])
def test_bad_bodies_are_400_in_anthropic_shape(plain, body, needle):
    r = plain.post("/v1/messages", body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]
    if "messages" in body:  # the SDK refuses a call without messages itself
        with pytest.raises(anthropic.BadRequestError):
            client(plain).messages.create(model="local", **{"max_tokens": 4, **body})
    ok = client(plain).messages.create(model="local", max_tokens=2, messages=ASK)  # still serving
    assert ok.usage.output_tokens > 0


def _valid_weather(inp: dict) -> None:
    assert isinstance(inp["city"], str) and set(inp) <= {"city", "unit"}
    assert inp.get("unit", "celsius") in ("celsius", "fahrenheit")


def _tool_loop(c, stream: bool):
    """call (forced), result, answer: the three turns of an agent's tool use."""
    def ask(**kw):
        if not stream:
            return c.messages.create(model="local", **kw)
        with c.messages.stream(model="local", **kw) as s:
            return s.get_final_message()

    first = ask(max_tokens=80, tools=[WEATHER, TIME], tool_choice=ONE_CALL, messages=ASK, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name in ("get_weather", "get_time") and use.id
    if use.name == "get_weather":
        _valid_weather(use.input)
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": [{"type": "text", "text": "18 degrees, sunny"}]}]}]
    answer = ask(max_tokens=12, tools=[WEATHER, TIME], tool_choice={"type": "none"}, messages=history,
                 extra_body=GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()
    return first, answer


def test_tool_loop(qwen):
    first, answer = _tool_loop(client(qwen), stream=False)
    # the answer's prompt starts with the first turn's: the cache held it
    assert answer.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens - 1


def test_tool_loop_streamed(qwen):
    _tool_loop(client(qwen), stream=True)  # the SDK parsed the input_json_delta pieces as JSON


def test_tool_stream_blocks(qwen):
    body = {"model": "local", "max_tokens": 80, "extra_body": GREEDY, "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            "messages": ASK}
    events = raw_events(qwen, body)
    starts = [d for n, d in events if n == "content_block_start"]
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert [d["index"] for d in starts] == list(range(len(starts))) == stops
    tool = starts[-1]
    assert tool["content_block"]["type"] == "tool_use" and tool["content_block"]["name"] == "get_weather"
    parts = [d["delta"]["partial_json"] for n, d in events
             if n == "content_block_delta" and d["index"] == tool["index"]]
    _valid_weather(json.loads("".join(parts)))
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_forced_tool_always_valid(qwen):
    c = client(qwen)
    for temp in (1.0, 1.5):  # greedy calls: the tests above
        m = c.messages.create(model="local", max_tokens=80, extra_body={"temperature": temp}, tools=[WEATHER, TIME],
                              tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
                              messages=[{"role": "user", "content": "Hello there"}])
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses and all(u.name == "get_time" for u in uses)
        for u in uses:
            assert isinstance(u.input["tz"], str) and set(u.input) == {"tz"}


def test_thinking_blocks(r1):
    c = client(r1)
    kw = {"model": "local", "max_tokens": 12, "extra_body": GREEDY,
          "thinking": {"type": "enabled", "budget_tokens": 1024},
          "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    m = c.messages.create(**kw)
    assert m.content[0].type == "thinking" and m.content[0].thinking.strip()
    assert m.content[0].signature == "" and m.stop_reason == "max_tokens"
    events = raw_events(r1, kw)
    block = [d for n, d in events if n.startswith("content_block") and d["index"] == 0]
    assert block[0]["content_block"]["type"] == "thinking"
    assert block[-1]["type"] == "content_block_stop" and block[-2]["delta"]["type"] == "signature_delta"
    assert "".join(d["delta"].get("thinking", "") for d in block[1:-1]) == m.content[0].thinking
    with c.messages.stream(**kw) as s:
        assert s.get_final_message().content[0].thinking == m.content[0].thinking


def test_structured_output_config(plain):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
              "required": ["answer"]}
    m = client(plain).messages.create(model="local", max_tokens=40, messages=ASK, extra_body=GREEDY,
                                      output_config={"format": {"type": "json_schema", "schema": schema}})
    got = json.loads(m.content[0].text)
    assert set(got) == {"answer"} and isinstance(got["answer"], str)


# -- the body read into a chat body (no server) ---------------------------------------------------

def test_body_conversion():
    from server.api.shapes.anthropic_request import to_chat_body

    chat = to_chat_body({
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=a5145;"},
                   {"type": "text", "text": "Be brief."}],
        "thinking": {"type": "disabled"},
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "tools": [WEATHER],
        "messages": [*ASK,
                     {"role": "assistant", "content": [
                         {"type": "thinking", "thinking": "Look it up.", "signature": "s"},
                         {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
                     {"role": "user", "content": [
                         {"type": "text", "text": "Here:"},
                         {"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": "no network"}]}]})
    sys_msg, user, call, result, text = chat["messages"]
    assert sys_msg["content"] == "x-anthropic-billing-header: cc_version=2; cch=fffff;Be brief."
    assert call["reasoning_content"] == "Look it up." and call["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the result comes right after the call it answers, the user's text after it
    assert result == {"role": "tool", "tool_call_id": "t1", "content": "Error: no network"}
    assert text["role"] == "user" and text["content"] == [{"type": "text", "text": "Here:"}]
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False and chat["max_tokens"] == 4096
    assert chat["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
