"""Chat messages to a prompt with the server's template (server/chat/templates.py).

Follows llama-server's prefill rules: a final assistant message is continued (no generation
prompt after it; unless --no-prefill-assistant); two assistant messages at the end, or both
`add_generation_prompt` and `continue_final_message`, are refused. A prefill given as text
parts is joined with a blank line (common_chat_msg::render_content), other messages' parts with
a newline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .options import DEFAULT_OPTIONS, ChatOptions, template_kwargs
from .plan import ChatPlan, plan_chat, with_system_text
from ..errors import bad_request
from ..fields import check_body, check_object, get_bool
from ..limits import (
    MAX_MESSAGES, MAX_MESSAGES_BYTES, MAX_TOOLS, MAX_TOOLS_BYTES, SCHEMA_MAX_DEPTH, check_count,
    check_schema, json_shape,
)
from .templates import TranscriptTemplate

# A message's fields other than role and content that templates read (tool calls, their ids,
# reasoning), passed on as sent.
PASSED_FIELDS = ("name", "tool_calls", "tool_call_id", "reasoning_content")
FALLBACK_TEMPLATE = TranscriptTemplate()  # what a server without a chat template uses


def _content_text(content: Any, i: int, sep: str = "\n") -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{i}].content: only parts of type 'text' are supported")
            parts.append(p["text"])
        return sep.join(parts)  # llama-server joins text parts with a newline
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts")


def marked(value: Any, mark) -> Any:
    """Every string in a JSON value passed through `mark` (keys too: a template may print them)."""
    if isinstance(value, str):
        return mark(value)
    if isinstance(value, list):
        return [marked(v, mark) for v in value]
    if isinstance(value, dict):
        return {marked(k, mark): marked(v, mark) for k, v in value.items()}
    return value


def parse_messages(body: dict, mark=None) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise bad_request("Expected 'messages' to be an array")
    if not msgs:
        raise bad_request("'messages' must not be empty")
    _check_size(msgs, "messages", MAX_MESSAGES_BYTES)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role must be a string")
        msg = {"role": role, "content": _content_text(m.get("content"), i)}
        msg.update((k, m[k]) for k in PASSED_FIELDS if m.get(k) is not None)
        if mark is not None:
            msg = marked(msg, mark)
        out.append(msg)
    return out


def _tools(body: dict) -> list | None:
    """OpenAI's `tools`, each checked enough to render (400 naming the bad field)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be an array")
    _check_size(tools, "tools", MAX_TOOLS_BYTES)
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request(f"tools[{i}] must be an object with type \"function\"")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"tools[{i}].function must be an object")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object")
        check_schema(fn.get("parameters"), f"tools[{i}].function.parameters")
    return tools or None


def _check_size(values: list, field: str, max_bytes: int) -> None:
    """The bytes of a list's strings in all (keys too) and its nesting, bounded: each is
    rendered by the template (which recurses into nested values)."""
    depth, _, n_bytes = json_shape(values, SCHEMA_MAX_DEPTH + 3, 1 << 62)
    if n_bytes > max_bytes:
        raise bad_request(f"'{field}' hold {n_bytes} bytes of text; the limit is {max_bytes}")
    if depth > SCHEMA_MAX_DEPTH + 3:  # the list, an entry, a field, then a schema
        raise bad_request(f"'{field}' are nested too deeply (more than {SCHEMA_MAX_DEPTH} levels)")


def _bound(body: dict) -> None:
    """The counts of messages and tools, first: a body of 100,000 messages is refused in
    microseconds, before any string of it is read."""
    for field, limit in (("messages", MAX_MESSAGES), ("tools", MAX_TOOLS)):
        if isinstance(body.get(field), list):
            check_count(body[field], limit, field)


@dataclass
class ChatPrompt:
    text: str
    prefill: str | None  # the final assistant message being continued, else None
    plan: ChatPlan       # tools, tool_choice and reasoning: how the answer is constrained and read


def render_chat(body: Any, template, default_reasoning: str = "auto", mark=None,
                options: ChatOptions = DEFAULT_OPTIONS) -> ChatPrompt:
    """messages + add_generation_prompt / continue_final_message to a prompt, as llama-server:
    a final assistant message is a prefill the model continues (no generation prompt after
    it); two assistant messages at the end, or both options true, are refused (400).
    `mark(text)` marks special-token texts in what users wrote (SpecialText.mark, handed down by the Service);
    `options`: the server's chat flags (options.py)."""
    _bound(check_object(body))
    check_body(body)
    messages = parse_messages(body, mark)
    tools, kwargs = _tools(body), template_kwargs(body, options)
    plan = plan_chat(body, template, tools, messages, default_reasoning, pure=options.skip_chat_parsing)
    messages = with_system_text(messages, plan.system_text)
    if mark is not None and tools:
        tools = marked(tools, mark)  # descriptions are users' text too (the grammar used the originals)
    chat = _render(body, template, messages, tools, kwargs, options.prefill_assistant, mark)
    chat.plan = plan
    if chat.prefill is not None:  # the answer is already under way: no opening of its own
        plan.prefill = ""
    plan.rendered(chat.text)
    return chat


def _render(body: dict, template, messages: list[dict], tools, kwargs, prefill_assistant: bool = True,
            mark=None) -> ChatPrompt:
    add_gen = get_bool(body, "add_generation_prompt", True)
    cfm = body.get("continue_final_message")
    # llama-server: true, "content" or "reasoning_content" continue; anything else does not
    cont = cfm is True or cfm in ("content", "reasoning_content")
    if not cont and prefill_assistant and messages[-1]["role"] == "assistant":
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise bad_request("Cannot have 2 or more assistant messages at the end of the list.")
        cont, add_gen = True, False
    if cont and add_gen:
        raise bad_request("Cannot set both add_generation_prompt and continue_final_message to true.")
    if cont and messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        parts = body["messages"][-1].get("content")
        if isinstance(parts, list):  # text parts: joined with "\n\n", as llama-server's prefill
            prefill = _content_text(parts, len(messages) - 1, "\n\n")
            prefill = mark(prefill) if mark is not None else prefill
        head = template.render(messages[:-1], True, tools, kwargs)
        if prefill:
            head += template.prefill_separator
        return ChatPrompt(head + prefill, prefill, ChatPlan())
    return ChatPrompt(template.render(messages, add_gen, tools, kwargs), None, ChatPlan())
