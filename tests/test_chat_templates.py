"""Chat templates rendered with jinja2 (server/chat/templates.py), from the templates of the fetched
llama.cpp source (models/templates/, read at test time), and the server using them."""

from __future__ import annotations

from datetime import datetime

import pytest
import requests

from server.chat.render import render_chat
from server.errors import ApiError
from server.chat.templates import JinjaTemplate, TemplateError, template_caps
from server_util import TEMPLATES, served_with_template

USER = [{"role": "user", "content": "Hello"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *USER]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def template(name: str, **kw) -> JinjaTemplate:
    kw = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos": True, **kw}
    return JinjaTemplate((TEMPLATES / name).read_text(), name, **kw)


def test_qwen_default_system_prompt_and_generation_prompt():
    t = template("Qwen-Qwen2.5-7B-Instruct.jinja")
    assert t.render(USER, True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(SYSTEM, False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n")


def test_tools_are_rendered_with_huggingface_tojson():
    out = template("Qwen-Qwen2.5-7B-Instruct.jinja").render(USER, True, [WEATHER])
    assert "# Tools" in out and "<tools>" in out and "<tool_call>" in out
    # transformers' tojson: no HTML escaping, keys in their order, non-ASCII kept
    assert '{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city"' in out
    cafe = dict(WEATHER, function=dict(WEATHER["function"], description="Café <b>"))
    assert "Café <b>" in template("Qwen-Qwen2.5-7B-Instruct.jinja").render(USER, True, [cafe])


def test_llama3_date_header_kwargs_and_bos():
    t = template("meta-llama-Llama-3.1-8B-Instruct.jinja", bos_token="<|begin_of_text|>")
    out = t.render(USER, True)
    assert not out.startswith("<|begin_of_text|>")  # the tokenizer adds BOS itself
    today = datetime.now().strftime("%d %b %Y")  # llama-server's date_string, not the template's 2024 default
    assert f"Cutting Knowledge Date: December 2023\nToday Date: {today}" in out
    assert out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Today Date: 01 Dec 2026" in t.render(USER, True, kwargs={"date_string": "01 Dec 2026"})
    kept = template("meta-llama-Llama-3.1-8B-Instruct.jinja", bos_token="<|begin_of_text|>", add_bos=False)
    assert kept.render(USER, True).startswith("<|begin_of_text|>")


def test_thinking_openers_and_enable_thinking():
    r1 = template("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").render(USER, True)
    assert r1.endswith("<｜Assistant｜><think>\n")
    q3 = template("Qwen-Qwen3-0.6B.jinja")
    assert q3.render(USER, True).endswith("<|im_start|>assistant\n")
    assert q3.render(USER, True, kwargs={"enable_thinking": False}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_raise_exception_is_a_400_and_a_system_role_is_merged_where_refused():
    gemma = template("google-gemma-2-2b-it.jinja")
    # no system role (its template raises): the system text goes before the first user turn
    assert gemma.render(SYSTEM, True) == ("<start_of_turn>user\nBe brief.\nHello<end_of_turn>\n"
                                          "<start_of_turn>model\n")
    with pytest.raises(ApiError) as e:  # two user turns in a row: its raise_exception
        gemma.render([*USER, *USER], True)
    assert e.value.status == 400 and "Conversation roles must alternate" in e.value.message


def test_every_template_of_the_source_compiles_and_most_render():
    names = sorted(p.name for p in TEMPLATES.glob("*.jinja"))
    assert len(names) >= 40
    rendered = 0
    for n in names:
        t = template(n)  # compiles, or TemplateError fails the test
        try:
            assert "Hello" in t.render(USER, True), n
            rendered += 1
        except ApiError:
            pass
    assert rendered >= 0.95 * len(names)
    with pytest.raises(TemplateError, match="does not parse"):
        JinjaTemplate("{% for m in messages %}{{ m.content }}")


def test_sandbox_refuses_python_internals():
    t = JinjaTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ApiError) as e:
        t.render(USER, True)
    assert e.value.status == 400


def test_caps_by_probing():
    qwen = template_caps(template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    assert qwen["supports_tools"] and qwen["supports_tool_calls"] and qwen["supports_system_role"]
    assert qwen["supports_parallel_tool_calls"]
    gemma = template_caps(template("google-gemma-2-2b-it.jinja"))
    assert not gemma["supports_system_role"] and not gemma["supports_tools"]


def test_prefill_and_tool_messages_reach_the_template():
    t = template("Qwen-Qwen2.5-7B-Instruct.jinja")
    body = {"messages": [*USER, {"role": "assistant", "content": "Hi, I am"}]}
    chat = render_chat(body, t)
    assert chat.prefill == "Hi, I am" and chat.text.endswith("<|im_start|>assistant\nHi, I am")
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    body = {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [WEATHER]}
    text = render_chat(body, t).text
    assert '"name": "get_weather"' in text and "<tool_response>\nsunny\n</tool_response>" in text
    assert '"arguments": {"city": "Paris"}' in text  # the JSON string given as an object, as llama-server
    with pytest.raises(ApiError, match=r"tools\[0\]\.function must be an object"):
        render_chat({"messages": USER, "tools": [{"type": "function"}]}, t)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with served_with_template(tmp_path_factory, "Qwen-Qwen2.5-7B-Instruct.jinja") as s:
        yield s


def test_server_renders_with_the_template(srv):
    p = srv.post("/apply-template", {"messages": USER}).json()["prompt"]
    assert p.startswith("<|im_start|>system\nYou are Qwen") and p.endswith("<|im_start|>assistant\n")
    props = srv.get("/props").json()
    assert props["chat_template_kind"] == "jinja" and "<|im_start|>" in props["chat_template"]
    assert props["chat_template_caps"]["supports_tools"] is True
    r = srv.post("/v1/chat/completions", {"messages": USER, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 20  # the system prompt too


def test_server_template_errors_are_400_and_it_keeps_serving(srv):
    r = srv.post("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": "x"})
    assert r.status_code == 400 and "chat_template_kwargs" in r.json()["error"]["message"]
    r = srv.post("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {}}]})
    assert r.status_code == 400 and "tools[0].function.name" in r.json()["error"]["message"]
    assert srv.post("/apply-template", {"messages": USER}).status_code == 200
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200
