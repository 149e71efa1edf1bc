"""Anthropic Messages request bodies (`POST /v1/messages`, `/v1/messages/count_tokens`) read
into the chat body our pipeline takes (server/chat/render.py, server/chat/plan.py).

What is converted, as llama-server's `server_chat_convert_anthropic_to_oai` does, and where
we are stricter (Anthropic's own API refuses these too):
- `system`: a string or a list of text blocks, becomes a system message.
- `messages`: required and non-empty; roles `user` / `assistant`; content a string or blocks:
  `text`, `thinking` (history: the assistant's `reasoning_content`), `redacted_thinking`
  (dropped), `tool_use` (an assistant tool call, `input` an object), `tool_result` (a `tool`
  message: string, text blocks or none, `is_error` marks the text). `image` blocks are refused
  (400, "image input is not supported": no vision model here; llama-server answers 500). Any
  other block type is a 400. `cache_control` on any block is accepted and ignored: the prompt
  cache is automatic.
- `tools` (name, description, input_schema), `tool_choice` (`auto`, `any`, `tool` + name,
  `none`; `disable_parallel_tool_use`), `stop_sequences`, `max_tokens` (llama-server's default
  4096 when absent), `temperature`, `top_p`, `top_k`, `metadata` (its `user_id` names the user for scheduling), `stream`,
  `thinking` (`enabled`, `adaptive`, `between_tools` / `disabled`: the template's
  `enable_thinking` switch; the budget is passed on as llama-server's `thinking_budget_tokens`),
  `output_config.format` (a JSON Schema: a `response_format`) and llama.cpp's
  `chat_template_kwargs`. Other fields (`cache_control`, `service_tier`, `output_config.effort`,
  ...) are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any

from ...errors import bad_request
from ...fields import check_object
from ...limits import MAX_MESSAGES, MAX_TOOLS, check_count

DEFAULT_MAX_TOKENS = 4096  # llama-server's, when a body has no max_tokens (Anthropic requires it)
ROLES = ("user", "assistant")
PASSED = ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs")
NO_IMAGES = "image input is not supported by this server (no vision model is loaded)"


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _text_of(blocks: Any, where: str) -> str:
    """The text of a `system` value or a tool result's content: a string, or text blocks
    (joined as llama-server joins them: without a separator)."""
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad_request(f"{where} must be a string or a list of text blocks")
    out = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if _is_obj(b) else None
        if kind == "image":
            raise bad_request(f"{where}[{j}]: {NO_IMAGES}")
        if kind != "text" or not isinstance(b.get("text"), str):
            raise bad_request(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}})")
        out.append(b["text"])
    return "".join(out)


BILLING = "x-anthropic-billing-header:"  # Claude Code's first system block


def _billing_stamp_fixed(text: str) -> str:
    """Claude Code starts its system prompt with a billing header whose `cch=XXXXX;` stamp
    changes with every request, so no cached prefix would reach past it: the stamp is
    written as "fffff", as llama-server does (ggml-org/llama.cpp#21793)."""
    if not text.startswith(BILLING):
        return text
    at = text.find("cch=", len(BILLING)) + 4
    if at >= 4 and text[at + 5:at + 6] == ";":
        return text[:at] + "fffff" + text[at + 5:]
    return text


def _system(system: Any) -> str:
    if isinstance(system, list) and all(_is_obj(b) for b in system):
        system = [{**b, "text": _billing_stamp_fixed(b["text"])} if isinstance(b.get("text"), str) else b
                  for b in system]
    elif isinstance(system, str):
        system = _billing_stamp_fixed(system)
    return _text_of(system, "system")


def _tool_call(b: dict, where: str) -> dict:
    if not isinstance(b.get("id"), str) or not b["id"]:
        raise bad_request(f"{where}.id must be a non-empty string")
    if not isinstance(b.get("name"), str) or not b["name"]:
        raise bad_request(f"{where}.name must be a non-empty string")
    args = b.get("input", {})
    if not _is_obj(args):
        raise bad_request(f"{where}.input must be an object")
    return {"id": b["id"], "type": "function",
            "function": {"name": b["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _tool_result(b: dict, where: str) -> dict:
    if not isinstance(b.get("tool_use_id"), str) or not b["tool_use_id"]:
        raise bad_request(f"{where}.tool_use_id must be a non-empty string")
    text = _text_of(b.get("content"), f"{where}.content")
    is_error = b.get("is_error", False)
    if not isinstance(is_error, bool):
        raise bad_request(f"{where}.is_error must be a boolean")
    if is_error:  # the model should know the call failed; the template has no field for it
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": b["tool_use_id"], "content": text}


def _message(m: Any, i: int) -> list[dict]:
    """One Anthropic message as chat messages: tool results become `tool` messages (first,
    right after the calls they answer), the rest one user or assistant message."""
    where = f"messages[{i}]"
    if not _is_obj(m):
        raise bad_request(f"{where} must be an object")
    role = m.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be \"user\" or \"assistant\"")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content blocks")
    texts, calls, results, thinking = [], [], [], []
    for j, b in enumerate(content):
        bw = f"{where}.content[{j}]"
        kind = b.get("type") if _is_obj(b) else None
        if kind == "text":
            if not isinstance(b.get("text"), str):
                raise bad_request(f"{bw}.text must be a string")
            texts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            raise bad_request(f"{bw}: {NO_IMAGES}")
        elif kind == "thinking":
            if not isinstance(b.get("thinking"), str):
                raise bad_request(f"{bw}.thinking must be a string")
            thinking.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue  # encrypted by Anthropic: nothing a local model can read
        elif kind == "tool_use":
            if role != "assistant":
                raise bad_request(f"{bw}: tool_use blocks belong to assistant messages")
            calls.append(_tool_call(b, bw))
        elif kind == "tool_result":
            if role != "user":
                raise bad_request(f"{bw}: tool_result blocks belong to user messages")
            results.append(_tool_result(b, bw))
        else:
            raise bad_request(f"{bw}.type must be one of text, image, thinking, redacted_thinking, "
                              f"tool_use, tool_result; got {kind!r}")
    out = list(results)
    if texts or calls or thinking or not results:
        msg: dict[str, Any] = {"role": role, "content": texts or ""}
        if calls:
            msg["tool_calls"] = calls
        if thinking:
            msg["reasoning_content"] = "".join(thinking)
        out.append(msg)
    return out


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise bad_request("tools must be a list")
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not _is_obj(t):
            raise bad_request(f"{where} must be an object")
        if t.get("type", "custom") != "custom":
            raise bad_request(f"{where}: server tools ({t.get('type')!r}) are not supported; "
                              "give custom tools with name and input_schema")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise bad_request(f"{where}.name must be a non-empty string")
        schema = t.get("input_schema", {"type": "object", "properties": {}})
        if not _is_obj(schema):
            raise bad_request(f"{where}.input_schema must be a JSON Schema object")
        desc = t.get("description", "")
        if not isinstance(desc, str):
            raise bad_request(f"{where}.description must be a string")
        out.append({"type": "function", "function": {"name": t["name"], "description": desc,
                                                     "parameters": schema}})
    return out


def _tool_choice(tc: Any, chat: dict) -> None:
    """Anthropic's tool_choice as OpenAI's (a named tool stays named: its call is forced)."""
    if not _is_obj(tc) or tc.get("type") not in ("auto", "any", "tool", "none"):
        raise bad_request('tool_choice must be {"type": "auto" | "any" | "tool" | "none"}')
    kind = tc["type"]
    if kind == "tool":
        if not isinstance(tc.get("name"), str) or not tc["name"]:
            raise bad_request('tool_choice {"type": "tool"} needs the tool\'s name')
        chat["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
    else:
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    no_parallel = tc.get("disable_parallel_tool_use")
    if no_parallel is not None:
        if not isinstance(no_parallel, bool):
            raise bad_request("tool_choice.disable_parallel_tool_use must be a boolean")
        chat["parallel_tool_calls"] = not no_parallel


THINKING = ("enabled", "adaptive", "between_tools", "disabled")  # all but the last turn it on


def _thinking(th: Any, chat: dict) -> None:
    """`thinking` → the template's enable_thinking switch (unless chat_template_kwargs sets it)."""
    if not _is_obj(th) or th.get("type") not in THINKING:
        raise bad_request(f"thinking.type must be one of {', '.join(THINKING)}")
    on = th["type"] != "disabled"
    budget = th.get("budget_tokens")
    if on and budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise bad_request("thinking.budget_tokens must be a non-negative integer")
        chat["thinking_budget_tokens"] = budget
    kwargs = chat.get("chat_template_kwargs")
    if kwargs is None or _is_obj(kwargs):
        chat["chat_template_kwargs"] = {"enable_thinking": on, **(kwargs or {})}


def _output_format(oc: Any, chat: dict) -> None:
    """`output_config.format` (a JSON Schema the answer must match) as a `response_format`."""
    if not _is_obj(oc):
        raise bad_request("output_config must be an object")
    fmt = oc.get("format")
    if fmt is None:
        return
    if not _is_obj(fmt) or fmt.get("type") != "json_schema" or not _is_obj(fmt.get("schema")):
        raise bad_request('output_config.format must be {"type": "json_schema", "schema": {...}}')
    chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}}


def to_chat_body(body: Any) -> dict:
    """An Anthropic Messages body as our chat body (OpenAI's field names). Raises ApiError
    (400) naming the bad field."""
    body = check_object(body)
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("messages: field required")
    if not isinstance(msgs, list):
        raise bad_request("messages must be a list")
    if not msgs:
        raise bad_request("messages: at least one message is required")
    check_count(msgs, MAX_MESSAGES, "messages")  # before any is read (render_chat bounds the rest)
    if isinstance(body.get("tools"), list):
        check_count(body["tools"], MAX_TOOLS, "tools")
    chat: dict[str, Any] = {k: body[k] for k in PASSED if k in body}
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _system(system)})
    for i, m in enumerate(msgs):
        messages.extend(_message(m, i))
    chat["messages"] = messages
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad_request("stop_sequences must be a list of strings")
        chat["stop"] = stops
    n = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad_request("max_tokens must be an integer of at least 1")
    chat["max_tokens"] = n
    meta = body.get("metadata")
    if meta is not None and not _is_obj(meta):
        raise bad_request("metadata must be an object")
    if meta and meta.get("user_id") is not None:  # the user, for fair scheduling
        chat["user"] = meta["user_id"]
    if body.get("thinking") is not None:
        _thinking(body["thinking"], chat)
    if body.get("output_config") is not None:
        _output_format(body["output_config"], chat)
    return chat
