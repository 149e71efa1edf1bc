"""Issue 31's reasoning and chat controls: --reasoning on|off|auto and the request's
enable_thinking / reasoning_effort, --chat-template-kwargs, --skip-chat-parsing,
--prefill-assistant, the reasoning budget (the block closed at N tokens with the message and
the template's end tag, on the real model) and POST /v1/chat/completions/control.

Templates are read from the fetched llama.cpp source at test time."""

from __future__ import annotations

import json

import pytest
import requests

from llama_lib.reasoning_budget import COUNTING, DONE, FORCING, IDLE, ReasoningBudget, ReasoningParams, ReasoningSwitch
from server.api.job import Defaults
from server.api.requests import parse_chat
from server.chat.options import ChatOptions
from server.chat.render import render_chat
from server.chat.templates import JinjaTemplate
from server.config.cli import parse_args
from server.config.cli_chat import chat_options
from server.errors import ApiError
from tests.server_util import TEMPLATES, served

R1 = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
USER = [{"role": "user", "content": "Count from one to ten in words."}]
MESSAGE = "Enough."


def template(name: str) -> JinjaTemplate:
    path = TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"{path} missing (run scripts/fetch_llama.sh)")
    return JinjaTemplate(path.read_text(), name)


# -- flags and fields that reach the template ---------------------------------------------

def test_reasoning_flags_become_template_kwargs_in_command_line_order():
    args = parse_args(["--chat-template-kwargs", '{"enable_thinking": true, "x": 1}', "-rea", "off",
                       "--reasoning-effort", "high", "--no-reasoning-preserve", "--reasoning-budget", "7",
                       "--reasoning-budget-message", "stop", "--skip-chat-parsing", "--no-prefill-assistant"])
    o = chat_options(args)
    assert o.template_kwargs == {"enable_thinking": False, "x": 1, "reasoning_effort": "high",
                                 "preserve_reasoning": False}
    assert (o.reasoning_budget, o.reasoning_budget_message, o.skip_chat_parsing, o.prefill_assistant) == \
        (7, "stop", True, False)
    auto = chat_options(parse_args(["--reasoning", "on", "--reasoning", "auto", "--reasoning-effort", "default"]))
    assert auto.template_kwargs == {"enable_thinking": True}  # auto leaves what was set
    assert chat_options(parse_args([])) == ChatOptions()
    for bad in (["--reasoning", "maybe"], ["--reasoning-budget", "-2"], ["--chat-template-kwargs", "[1]"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2


def test_enable_thinking_from_flag_request_and_reasoning_effort():
    t = template(R1)  # writes "</think>" after "<think>\n" when enable_thinking is false
    on = render_chat({"messages": USER}, t).text
    assert on.endswith("<think>\n")
    off = ChatOptions(template_kwargs={"enable_thinking": False})
    assert render_chat({"messages": USER}, t, options=off).text.endswith("<think>\n</think>")
    # the request's chat_template_kwargs override the server's
    assert render_chat({"messages": USER, "chat_template_kwargs": {"enable_thinking": True}}, t,
                       options=off).text.endswith("<think>\n")
    # reasoning_effort "none" turns thinking off; a string enable_thinking is a 400
    assert render_chat({"messages": USER, "reasoning_effort": "none"}, t).text.endswith("</think>")
    with pytest.raises(ApiError, match="enable_thinking"):
        render_chat({"messages": USER, "chat_template_kwargs": {"enable_thinking": "false"}}, t)


def test_reasoning_effort_and_kwargs_reach_the_template():
    t = JinjaTemplate("{{ reasoning_effort }}/{{ reasoning_strength }}/{{ custom }}/{{ drop_thinking }}")
    opts = ChatOptions(template_kwargs={"custom": "srv", "reasoning_effort": "low", "preserve_reasoning": True})
    assert render_chat({"messages": USER}, t, options=opts).text == "low/low/srv/False"
    assert render_chat({"messages": USER, "reasoning_effort": "high", "chat_template_kwargs": {"custom": "req"}},
                       t, options=opts).text == "high/high/req/False"


def test_undefined_variables_render_empty_as_llama_server():
    t = template("fireworks-ai-llama-3-firefunction-v2.jinja")  # concatenates an undefined `functions`
    assert render_chat({"messages": USER}, t).text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert JinjaTemplate('{{ "a" + nothing + "b" }}|{{ nothing }}|{% for x in nothing %}x{% endfor %}') \
        .render(USER) == "ab||"


def test_prefill_parts_joined_with_a_blank_line_and_no_prefill_assistant():
    t = template("meta-llama-Llama-3.3-70B-Instruct.jinja")
    parts = [{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}]
    body = {"messages": [*USER, {"role": "assistant", "content": parts}]}
    assert render_chat(body, t).text.endswith("<|end_header_id|>\n\nWh\n\nill")
    whole = render_chat(body, t, options=ChatOptions(prefill_assistant=False)).text
    # a whole assistant turn (its parts joined by a newline), then a new generation prompt
    assert "Wh\nill<|eot_id|>" in whole and whole.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tool_call_arguments_as_objects_where_the_template_reads_them():
    """Gemma 4 writes an object in its own format (llama-server passes the object); a template
    that prints `arguments` as text keeps the string."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    body = {"messages": [*USER, {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": [tool]}
    t = template("google-gemma-4-31B-it.jinja")
    assert t.caps["supports_object_arguments"]
    assert "call:get_weather{city:<|\"|>Paris<|\"|>}" in render_chat(body, t).text
    coder = template("Qwen3-Coder.jinja")  # iterates the arguments' items
    assert "<parameter=city>\nParis\n</parameter>" in render_chat(body, coder).text
    raw = JinjaTemplate("{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments }}"
                        "{% endfor %}{% endfor %}")
    assert not raw.caps["supports_object_arguments"]
    assert render_chat(body, raw).text == '{"city": "Paris"}'


def test_skip_chat_parsing_returns_the_answer_raw():
    t = template("Qwen-Qwen3-0.6B.jinja")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = {"messages": USER, "tools": [tool], "tool_choice": "required"}
    parsed = parse_chat(body, Defaults(), t)
    assert parsed.chat is not None and parsed.params.sampling.grammar and parsed.params.sampling.reasoning
    raw = parse_chat(body, Defaults(chat=ChatOptions(skip_chat_parsing=True)), t)
    assert raw.chat is None and not raw.params.sampling.grammar and raw.params.sampling.reasoning is None
    assert '"name": "f"' in raw.prompt  # the tools are still rendered


def test_budget_fields_and_defaults():
    t = template(R1)
    d = Defaults(chat=ChatOptions(reasoning_budget=9, reasoning_budget_message="m"))
    r = parse_chat({"messages": USER}, d, t).params.sampling.reasoning
    assert (r.start, r.end, r.budget, r.message, r.opened, r.switch.enabled) == ("<think>", "</think>", 9, "m", True, False)
    r = parse_chat({"messages": USER, "thinking_budget_tokens": 0, "reasoning_budget_message": "",
                    "reasoning_control": True}, d, t).params.sampling.reasoning
    assert (r.budget, r.message, r.switch.enabled) == (0, "", True)
    for bad in ({"reasoning_budget_tokens": -2}, {"reasoning_control": "yes"}, {"reasoning_budget_message": 3}):
        with pytest.raises(ApiError):
            parse_chat({"messages": USER, **bad}, d, t)
    plain = template("meta-llama-Llama-3.3-70B-Instruct.jinja")  # no thinking: no budget stage
    assert parse_chat({"messages": USER, "reasoning_budget_tokens": 3}, d, plain).params.sampling.reasoning is None


def test_budget_state_machine_on_the_real_vocab(vocab):
    def toks(s):
        return [int(x) for x in vocab.tokenize(s, add_special=False, parse_special=True)]

    p = ReasoningParams("<think>", "</think>", budget=2, message=" ok")
    b = ReasoningBudget(p, vocab)
    assert b.state == IDLE and b.forced() is None
    for t in toks("<think>"):
        b.accept(t)
    assert b.state == COUNTING
    b.accept(toks("a")[0])
    b.accept(toks("b")[0])
    assert b.state == FORCING
    out = []
    while (t := b.forced()) is not None:
        out.append(t)
        b.accept(t)
    assert vocab.detokenize(out) == " ok</think>" and b.state == DONE
    # a natural end before the budget stops counting; budget 0 with the block opened forces at once
    b = ReasoningBudget(ReasoningParams("<think>", "</think>", budget=50, opened=True), vocab)
    for t in toks("x</think>"):
        b.accept(t)
    assert b.state == DONE
    assert ReasoningBudget(ReasoningParams("<think>", "</think>", budget=0, opened=True), vocab).state == FORCING
    # the control switch ends a counting block (only a running request's)
    sw = ReasoningSwitch()
    b = ReasoningBudget(ReasoningParams("<think>", "</think>", opened=True, switch=sw), vocab)
    assert not sw.request_end()  # not marked live yet: refused
    sw.mark_live()
    assert sw.request_end() and b.forced() == toks("</think>")[0] and b.state == FORCING


# -- on the real model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("reasoning") / "server.log"
    with served(["-np", "2", "-c", "2048", "--chat-template-file", str(TEMPLATES / R1),
                 "--reasoning-budget-message", MESSAGE], log) as s:
        yield s


def _chat(srv, **kw) -> dict:
    body = {"messages": USER, "temperature": 0, "max_tokens": 24, "ignore_eos": True, **kw}
    r = srv.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_budget_closes_the_block_at_n_tokens_with_the_message(srv):
    j = _chat(srv, reasoning_budget_tokens=5, reasoning_format="none", logprobs=True, top_logprobs=1)
    content = j["choices"][0]["message"]["content"]
    pieces = [t["token"] for t in j["choices"][0]["logprobs"]["content"]]
    assert "".join(pieces) == content
    # five tokens of thinking, then the message and the end tag, then the answer goes on
    assert "".join(pieces[5:]).startswith(MESSAGE + "</think>"), content
    assert MESSAGE + "</think>" not in "".join(pieces[:5]) + pieces[5]
    assert len(content) > len("".join(pieces[:5])) + len(MESSAGE + "</think>")
    # split as usual: the message ends the reasoning
    j = _chat(srv, reasoning_budget_tokens=5)
    msg = j["choices"][0]["message"]
    assert msg["reasoning_content"].endswith(MESSAGE) and msg["content"]


def test_budget_zero_closes_at_once_and_unlimited_does_not(srv):
    j = _chat(srv, reasoning_budget_tokens=0, reasoning_budget_message="", reasoning_format="none")
    assert j["choices"][0]["message"]["content"].startswith("</think>")
    free = _chat(srv, reasoning_format="none")["choices"][0]["message"]["content"]
    assert "</think>" not in free and MESSAGE not in free


def test_completion_budget_fields(srv):
    """/completion's low-level fields: the block opens when the model writes the start tag
    (here its own first token, read off a plain run), two tokens later the message and the
    first end tag are forced."""
    body = {"prompt": "Numbers: one, two, three,", "temperature": 0, "n_predict": 12, "n_probs": 1,
            "ignore_eos": True}
    plain = srv.post("/completion", body).json()
    first = plain["completion_probabilities"][0]["token"]
    j = srv.post("/completion", {**body, "reasoning_budget_tokens": 2, "reasoning_budget_start_tag": first,
                                 "reasoning_budget_end_tags": ["</x>", "</y>"],
                                 "reasoning_budget_message": " M"}).json()
    pieces = [p["token"] for p in j["completion_probabilities"]]
    assert pieces[:3] == [p["token"] for p in plain["completion_probabilities"][:3]]
    assert "".join(pieces[3:]).startswith(" M</x>"), pieces
    r = srv.post("/completion", {**body, "reasoning_budget_tokens": 2, "reasoning_budget_start_tag": first,
                                 "reasoning_budget_end_tags": "</x>"})
    assert r.status_code == 400


def test_control_ends_a_running_thinking_block(srv):
    body = {"messages": USER, "temperature": 0, "max_tokens": 120, "ignore_eos": True, "stream": True,
            "reasoning_control": True, "reasoning_format": "none"}
    text, cid, answers = [], None, []
    with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            cid = ev["id"]
            for c in ev["choices"]:
                text.append(c["delta"].get("content") or "")
            if len(text) == 4 and not answers:
                answers.append(srv.post("/v1/chat/completions/control",
                                        {"id": cid, "action": "reasoning_end"}).json())
    out = "".join(text)
    assert answers == [{"success": True}]
    cut = out.find(MESSAGE + "</think>")
    assert cut > 0 and cut < len(out) - len(MESSAGE + "</think>"), out  # ended mid-answer, then went on
    # over now; a completion without reasoning_control; an unknown id; bad bodies
    assert srv.post("/v1/chat/completions/control", {"id": cid, "action": "reasoning_end"}).json() == \
        {"success": False, "message": "no active completion for this id"}
    assert srv.post("/v1/chat/completions/control", {"id": "chatcmpl-nope", "action": "reasoning_end"}).json()[
        "success"] is False
    for bad in ({"action": "reasoning_end"}, {"id": cid, "action": "pause"}):
        r = srv.post("/v1/chat/completions/control", bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_control_refused_without_reasoning_control(srv):
    body = {"messages": USER, "temperature": 0, "max_tokens": 200, "ignore_eos": True, "stream": True,
            "reasoning_format": "none"}
    got = []
    with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            ev = json.loads(line[6:]) if line.startswith(b"data: {") else {}
            if any(c["delta"].get("content") for c in ev.get("choices", ())) and not got:
                cid = ev["id"]  # generating: its sampler runs
                got.append(srv.post("/v1/chat/completions/control", {"id": cid, "action": "reasoning_end"}).json())
    assert got == [{"success": False, "message": "reasoning control not enabled for this completion"}]
