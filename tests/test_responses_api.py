"""OpenAI's Responses API (`/v1/responses`) with the real `openai` SDK as the judge: a plain
answer, the stream's events in order with increasing sequence numbers, whole tool loops
(function_call -> function_call_output -> answer) streamed and not, forced tool choices always
valid, text.format json_schema, reasoning items, a previous_response_id chain whose later turns
decode only the new tokens (usage.input_tokens_details.cached_tokens), stored responses
(retrieve, delete, 404, the byte bound evicting the least recently used), input_tokens equal
to what the prompt decodes, and bad bodies as 400s while the server keeps serving.

Servers: the default model with its default template path (`plain`), with Qwen 2.5's Jinja
template (hermes tool calls; a small --responses-store), and with DeepSeek R1's (thinking).
"""

from __future__ import annotations

import json

import pytest
import requests

from server.api.response_store import ResponseStore
from server.api.shapes.responses_input import to_chat_body
from server_util import served, served_with_template, TEMPLATES

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                       "required": ["tz"]}}
STORE_MIB = 0.015  # the qwen server's --responses-store: a few small responses


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    log = tmp_path_factory.mktemp("responses-plain") / "server.log"
    with served(["-np", "2", "-c", "4096"], log) as s:
        yield s


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    log = tmp_path_factory.mktemp("responses-qwen") / "server.log"
    with served(["-np", "2", "-c", "8192", "--responses-store", str(STORE_MIB),
                 "--chat-template-file", str(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja")], log) as s:
        yield s


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    with served_with_template(tmp_path_factory, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", ctx=4096) as s:
        yield s


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)


def _valid_weather(args: str) -> dict:
    a = json.loads(args)
    assert isinstance(a["city"], str) and set(a) <= {"city", "unit"}
    return a


def _events(stream) -> list:
    events = list(stream)
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(len(events))), seqs  # every event numbered, from 0, in order
    return events


# -- the body as a chat (no server) ---------------------------------------------------------------

def test_items_become_chat_messages():
    body = {"instructions": "Be brief.", "max_output_tokens": 9, "tools": [WEATHER, {"type": "web_search"}],
            "tool_choice": {"type": "function", "name": "get_weather"}, "reasoning": {"effort": "none"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris?"}]},
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]}
    chat, req = to_chat_body(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}], "reasoning_content": "hm",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert req.messages == chat["messages"][1:]  # the conversation a store keeps: no instructions
    assert chat["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["max_tokens"] == 9 and "input" not in chat and "instructions" not in chat
    assert chat["chat_template_kwargs"] == {"enable_thinking": False, "reasoning_effort": "none"}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


def test_a_follow_up_puts_the_stored_conversation_first_and_leaves_it_unchanged():
    store = ResponseStore(1 << 20)
    stored = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    store.put("resp_a", {"id": "resp_a"}, stored)
    chat, req = to_chat_body({"previous_response_id": "resp_a", "instructions": "New rules.",
                              "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
                             store)
    assert chat["messages"][0] == {"role": "system", "content": "New rules."}
    # the stored turns render as before (the cached prefix); new items never merge into them
    assert chat["messages"][1:3] == stored and chat["messages"][3]["tool_calls"][0]["id"] == "c"
    assert store.get("resp_a").messages == stored == req.messages[:2]
    assert to_chat_body({"input": "x", "store": False}, store)[1].store is None


def test_reasoning_effort_is_the_templates_thinking_switch():
    from server.chat.render import render_chat
    from server.chat.templates import JinjaTemplate
    qwen3 = JinjaTemplate((TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text())

    def prompt(effort):
        return render_chat(to_chat_body({"input": "hi", "reasoning": {"effort": effort}})[0], qwen3).text
    assert prompt("none").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert prompt("minimal") == prompt("none")
    assert prompt("high").endswith("<|im_start|>assistant\n") == prompt("low").endswith("assistant\n") is True


# -- answers ----------------------------------------------------------------------------------

def test_plain_answer(plain):
    r = client(plain).responses.create(model="m", instructions="Answer briefly.",
                                       input=[{"role": "user", "content": "What is the best book?"}],
                                       max_output_tokens=8, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete")
    (msg,) = r.output
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.role == "assistant"
    assert msg.content[0].type == "output_text" and r.output_text == msg.content[0].text != ""
    u = r.usage
    assert u.output_tokens <= 8 and u.total_tokens == u.input_tokens + u.output_tokens > 8
    assert r.instructions == "Answer briefly." and r.max_output_tokens == 8 and r.temperature == 0
    if u.output_tokens == 8:  # cut by max_output_tokens: OpenAI says incomplete
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_stream_events_in_order(plain):
    body = {"model": "m", "input": "Write one sentence about the sea.", "max_output_tokens": 10, "temperature": 0}
    events = _events(client(plain).responses.create(**body, stream=True))
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    n = types.count("response.output_text.delta")
    assert types[4:4 + n] == ["response.output_text.delta"] * n
    assert types[4 + n:] == ["response.output_text.done", "response.content_part.done",
                             "response.output_item.done", types[-1]]
    assert types[-1] in ("response.completed", "response.incomplete")
    last = events[-1].response
    item_id = events[2].item.id
    assert item_id.startswith("msg_") and events[0].response.id == last.id and last.id.startswith("resp_")
    assert all(e.item_id == item_id for e in events[3:-2])
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == last.output_text == events[-4].text != ""
    # the same request not streamed gives the same text (greedy)
    assert client(plain).responses.create(**body).output_text == text
    # on the wire each event is named by an `event:` line, as OpenAI and llama-server send them
    with requests.post(plain.url + "/v1/responses", json={**body, "stream": True}, stream=True, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    names = [ln[len(b"event: "):].decode() for ln in lines if ln.startswith(b"event: ")]
    datas = [json.loads(ln[len(b"data: "):]) for ln in lines if ln.startswith(b"data: ")]
    assert len(lines) == 2 * len(datas) and names == [d["type"] for d in datas] == types


# -- tools --------------------------------------------------------------------------------------

def _call_items(events_or_response, streamed: bool):
    if not streamed:
        return [o for o in events_or_response.output if o.type == "function_call"]
    events = events_or_response
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert done and args == "".join(c.arguments for c in done)
    assert [c.model_dump() for c in done] == [o.model_dump() for o in events[-1].response.output
                                              if o.type == "function_call"]
    return done


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("chained", [False, True])
def test_tool_loop(qwen, streamed, chained):
    """call -> result -> answer; the follow-up sends only its new item (chained) or all items."""
    c = client(qwen)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]

    def create(**kw):
        kw = {"model": "m", "tools": [WEATHER], "temperature": 0, **kw}
        return _events(c.responses.create(**kw, stream=True)) if streamed else c.responses.create(**kw)

    first = create(input=question, tool_choice="required", parallel_tool_calls=False, max_output_tokens=60)
    (call,) = _call_items(first, streamed)
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.name == "get_weather"
    _valid_weather(call.arguments)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    rid = (first[-1].response if streamed else first).id
    if chained:
        second = create(input=[result], previous_response_id=rid, tool_choice="none", max_output_tokens=12)
    else:
        item = {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
        second = create(input=question + [item, result], tool_choice="none", max_output_tokens=12)
    answer = second[-1].response if streamed else second
    assert [o.type for o in answer.output] == ["message"] and answer.output_text
    if chained:  # the stored turn (question, call) is the prompt's prefix
        assert answer.usage.input_tokens_details.cached_tokens > 0.8 * (first[-1].response if streamed else first).usage.input_tokens


def test_forced_tool_choices_are_always_valid(qwen):
    c = client(qwen)
    for seed in range(2):
        for choice in ("required", {"type": "function", "name": "get_time"}):
            r = c.responses.create(model="m", input="Tell me a story about a dragon.", tools=[WEATHER, TIME],
                                   tool_choice=choice, max_output_tokens=60, temperature=1.0,
                                   parallel_tool_calls=False, extra_body={"seed": seed}, store=False)
            (call,) = [o for o in r.output if o.type == "function_call"]
            args = json.loads(call.arguments)
            if isinstance(choice, dict):
                assert call.name == "get_time"
            assert set(args) == {"tz"} if call.name == "get_time" else _valid_weather(call.arguments)


def test_text_format_json_schema(plain):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client(plain).responses.create(
        model="m", input="Invent a person.", max_output_tokens=40, temperature=1.0, store=False,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    v = json.loads(r.output_text)
    assert set(v) == {"name", "age"} and isinstance(v["age"], int) and 0 <= v["age"] <= 150
    assert r.text.format.type == "json_schema"


def test_reasoning_items(r1):
    c = client(r1)
    body = {"model": "m", "input": "What is 2 + 2?", "max_output_tokens": 12, "temperature": 0, "store": False}
    r = c.responses.create(**body)
    (item,) = r.output  # 12 tokens: still thinking, so only the reasoning item
    assert item.type == "reasoning" and item.id.startswith("rs_") and item.content[0].text.strip()
    assert "</think>" not in item.content[0].text
    events = _events(c.responses.create(**body, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == item.content[0].text
    assert [e.type for e in events if e.type.startswith("response.output_item")] == [
        "response.output_item.added", "response.output_item.done"]


# -- stored responses and the prompt cache -----------------------------------------------------

@pytest.mark.parametrize("which", ["plain", "qwen"])
def test_previous_response_chain_decodes_only_new_tokens(request, which):
    s = request.getfixturevalue(which)
    c = client(s)
    turns = ["Name a colour.", "Name another one.", "And a third?"]
    prev = None
    for i, text in enumerate(turns):
        kw = {"previous_response_id": prev.id} if prev else {}
        body = {"model": "m", "input": text, "instructions": "You are terse.", "max_output_tokens": 8,
                "temperature": 0, **kw}
        counted = c.responses.input_tokens.count(**{k: v for k, v in body.items()
                                                    if k not in ("max_output_tokens", "temperature")})
        assert counted.object == "response.input_tokens"
        n_in = counted.input_tokens
        r = c.responses.create(**body)
        u = r.usage
        assert u.input_tokens == n_in  # what input_tokens counts is what the prompt decodes
        if prev is not None:
            before = prev.usage.input_tokens + prev.usage.output_tokens
            # the previous prompt and answer are cached (the last sampled token was never
            # decoded), so only the new turn is: at most its tokens and that one
            assert u.input_tokens_details.cached_tokens >= before - 2, (i, u, prev.usage)
            assert u.input_tokens - u.input_tokens_details.cached_tokens <= u.input_tokens - before + 2
        prev = r
    got = c.responses.retrieve(prev.id)
    assert got.id == prev.id and got.output_text == prev.output_text


def test_unknown_deleted_and_unstored_ids_are_404(plain):
    c = client(plain)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="m", input="hi", previous_response_id="resp_nope", max_output_tokens=2)
    r = c.responses.create(model="m", input="hi", max_output_tokens=2)
    assert c.responses.retrieve(r.id).model_dump() == {k: v for k, v in r.model_dump().items() if k != "timings"}
    # llama-server's paths without /v1 too
    assert requests.get(f"{plain.url}/responses/{r.id}", timeout=10).json()["id"] == r.id
    assert requests.post(f"{plain.url}/responses/input_tokens", json={"input": "hi"}, timeout=10).json()["input_tokens"] > 0
    c.responses.delete(r.id)
    for call in (lambda: c.responses.retrieve(r.id), lambda: c.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    r = c.responses.create(model="m", input="hi", max_output_tokens=2, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve(r.id)
    assert e.value.status_code == 404 and "not found" in e.value.body["message"]


def test_store_is_lru_by_bytes():
    store = ResponseStore(3000)
    for i in range(3):
        assert store.put(f"r{i}", {"id": f"r{i}", "pad": "x" * 800}, [])
    store.get("r0")  # used: now the most recent
    assert store.put("r3", {"id": "r3", "pad": "x" * 800}, [])
    assert store.get("r1") is None and store.get("r0") is not None and store.n_bytes <= 3000
    assert not store.put("big", {"pad": "x" * 4000}, []) and store.get("big") is None
    assert ResponseStore(0).put("a", {}, []) is False


def test_responses_store_flag(capsys):
    from server.config.cli import parse_args
    from server.config.settings import build_settings
    from server.service import Service
    assert build_settings(parse_args([])).responses_store_mib == 64
    assert Service(build_settings(parse_args(["--responses-store", "0.5"]))).responses.max_bytes == 2**19
    with pytest.raises(SystemExit):
        parse_args(["--responses-store", "-1"])
    assert "--responses-store" in capsys.readouterr().err


def test_the_servers_store_evicts_the_least_recently_used(qwen):
    c = client(qwen)
    first = c.responses.create(model="m", input="Say hi.", max_output_tokens=1)
    kept = c.responses.create(model="m", input="Say ho.", max_output_tokens=1)
    pad = "pad " * 300  # each stored response holds its input: ~2.5 KB with the response object
    for i in range(int(STORE_MIB * 2**20 / 2000) + 1):  # more than the store holds
        c.responses.retrieve(kept.id)  # kept in use; first is not (a retrieve would use it)
        c.responses.create(model="m", input=f"{pad} {i}", max_output_tokens=1)  # a cached prefix
    assert c.responses.retrieve(kept.id).id == kept.id
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="m", input="again", previous_response_id=first.id, max_output_tokens=2)


# -- bad bodies -----------------------------------------------------------------------------------

def test_bad_bodies_are_400_in_openai_shape(qwen):
    cases = [
        ({}, "'input' is required"),
        ({"input": []}, "'input' must not be empty"),
        ({"input": 5}, "'input'"),
        ({"input": [{"type": "bogus"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"input": [{"role": "user", "content": [{"type": "output_audio"}]}]}, "input[0].content[0].type"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
        ({"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}]}, "tool"),
        ({"input": "hi", "tools": "x"}, "'tools'"),
        ({"input": "hi", "tools": [{"type": "function", "name": ""}]}, "tools[0].name"),
        ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"input": "hi", "instructions": 3}, "instructions"),
        ({"input": "hi", "max_output_tokens": "many"}, "max_output_tokens"),
    ]
    for body, needle in cases:
        r = requests.post(qwen.url + "/v1/responses", json={"model": "m", **body}, timeout=60)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and needle in err["message"], (needle, err)
    with pytest.raises(openai.BadRequestError):
        client(qwen).responses.create(model="m", input=[])
    r = requests.post(qwen.url + "/v1/responses", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "error" in r.json()
    assert client(qwen).responses.create(model="m", input="hi", max_output_tokens=2, store=False).output_text
