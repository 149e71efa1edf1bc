"""OpenAI Responses request bodies as the chat bodies the server already renders.

`input` (a string, or items: messages with `input_text` / `output_text` parts,
`function_call`, `function_call_output`, `reasoning`) becomes chat `messages`; `instructions`
a system message in front; `tools` (function tools) and `tool_choice` their chat forms;
`max_output_tokens` max_tokens; `text.format` response_format (json_schema: our grammar);
`reasoning.effort` the template's thinking switch. With `previous_response_id` the stored
conversation (server.api.response_store) comes before the new items, so the prompt starts with
the tokens the previous turn decoded. Bad bodies are 400s naming the field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ...errors import ApiError, bad_request
from ...fields import check_body, get_bool, get_int

# Responses fields that have no chat counterpart of the same name (converted or dropped here);
# the rest of the body (temperature, top_p, seed, llama-server's own fields) passes on as sent
RESPONSES_ONLY = ("input", "instructions", "previous_response_id", "store", "tools", "tool_choice",
                  "max_output_tokens", "text", "reasoning", "metadata", "include", "truncation",
                  "background", "user", "prompt_cache_key", "safety_identifier", "service_tier",
                  "n", "n_cmpl", "stream_options", "timings_per_token", "return_progress",
                  "max_tool_calls", "top_logprobs")
# the request fields a response object repeats (OpenAI's Response has them all)
ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls",
          "previous_response_id", "temperature", "top_p", "tool_choice", "tools", "text", "reasoning")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@dataclass(frozen=True)
class ResponsesRequest:
    """What the Responses shape needs beyond the chat job: the conversation to store, the
    store itself, the fields the response object repeats."""

    messages: list[dict]              # the conversation so far in chat form (no instructions)
    store: Any = None                 # a ResponseStore when the answer is to be kept
    echo: dict = field(default_factory=dict)
    timings_per_token: bool = False   # llama-server's: timings on each delta event
    return_progress: bool = False     # llama-server's: prompt_progress once the prompt is decoded


def _text_parts(content: Any, where: str, allowed: tuple[str, ...]) -> str | list[dict]:
    """A message item's content: a string, or parts of the allowed text types (chat text parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise bad_request(f"{where}.content[{j}]: '{kind}' is not supported by this server (text only)")
        if kind not in allowed:
            raise bad_request(f"{where}.content[{j}].type must be one of {', '.join(allowed)}")
        text = p.get("refusal") if kind == "refusal" else p.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.content[{j}] needs a string 'text'")
        out.append({"type": "text", "text": text})
    return out


def _tool_output(out: Any, where: str) -> str | list[dict]:
    if isinstance(out, str):
        return out
    if isinstance(out, list):
        return _text_parts(out, where, ("input_text", "output_text"))
    raise bad_request(f"{where}.output must be a string or a list of input_text parts")


def _last_assistant(msgs: list[dict]) -> dict | None:
    return msgs[-1] if msgs and msgs[-1]["role"] == "assistant" else None


def _add_item(msgs: list[dict], item: Any, i: int) -> None:
    """One input item appended to the chat messages (assistant parts merged into one turn)."""
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object")
    kind, role = item.get("type"), item.get("role")
    if kind in (None, "message") and role is not None:
        if role not in ("user", "system", "developer", "assistant"):
            raise bad_request(f"{where}.role must be one of user, system, developer, assistant")
        allowed = ("output_text", "input_text", "refusal") if role == "assistant" else ("input_text",)
        content = _text_parts(item.get("content"), where, allowed)
        prev = _last_assistant(msgs)
        if role == "assistant" and prev is not None and not prev.get("content"):
            prev["content"] = content  # after its reasoning item: the same turn
            return
        msgs.append({"role": "system" if role == "developer" else role, "content": content})
    elif kind == "function_call":
        for k in ("call_id", "name", "arguments"):
            if not isinstance(item.get(k), str):
                raise bad_request(f"{where}.{k} must be a string")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        prev = _last_assistant(msgs)
        if prev is None:
            msgs.append(prev := {"role": "assistant", "content": None})
        prev.setdefault("tool_calls", []).append(call)
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_request(f"{where}.call_id must be a string")
        msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                     "content": _tool_output(item.get("output"), where)})
    elif kind == "reasoning":
        parts = item.get("content") or item.get("summary") or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts):
            raise bad_request(f"{where}: a reasoning item's content must be a list of text parts")
        text = "\n".join(p["text"] for p in parts)
        prev = _last_assistant(msgs)
        if prev is None:
            msgs.append(prev := {"role": "assistant", "content": None})
        prev["reasoning_content"] = text
    elif kind == "item_reference":
        raise bad_request(f"{where}: item references are not supported; use previous_response_id")
    else:
        raise bad_request(f"{where}: cannot determine the item's type (a message needs a role; "
                          "other items: function_call, function_call_output, reasoning)")


def input_messages(body: dict) -> list[dict]:
    """The body's `input` as chat messages."""
    v = body.get("input")
    if v is None:
        raise bad_request("'input' is required")
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    if not isinstance(v, list):
        raise bad_request("'input' must be a string or an array of items")
    if not v:
        raise bad_request("'input' must not be empty")
    msgs: list[dict] = []
    for i, item in enumerate(v):
        _add_item(msgs, item, i)
    return msgs


def chat_tools(body: dict) -> list | None:
    """Function tools in chat form; the hosted tools (web_search, ...) have no local meaning
    and are skipped, as llama-server does."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of objects")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"tools[{i}] must be an object")
        if t.get("type") != "function":
            continue
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise bad_request(f"tools[{i}].name must be a non-empty string")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out or None


def chat_tool_choice(v: Any) -> Any:
    """{"type": "function", "name": n} (Responses) -> {"type": "function", "function": {"name": n}}."""
    if isinstance(v, dict) and v.get("type") == "function" and "function" not in v:
        return {"type": "function", "function": {"name": v.get("name")}}
    if isinstance(v, dict) and v.get("type") == "allowed_tools":
        return v.get("mode", "auto")
    return v


def response_format(text: Any) -> dict | None:
    """`text.format` as chat's response_format."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("'text.format' must be an object")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("'text.format.schema' must be a JSON Schema object")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"]}}
    raise bad_request(f"'text.format.type' must be one of text, json_object, json_schema, got {kind!r}")


def thinking_kwargs(reasoning: Any) -> dict:
    """`reasoning.effort` as the template's thinking switch: `enable_thinking` (Qwen 3 style
    templates) off for "none" / "minimal", and `reasoning_effort` (gpt-oss style) as given."""
    if reasoning is None:
        return {}
    if not isinstance(reasoning, dict):
        raise bad_request("'reasoning' must be an object")
    effort = reasoning.get("effort")
    if effort is None:
        return {}
    if effort not in EFFORTS:
        raise bad_request(f"'reasoning.effort' must be one of {', '.join(EFFORTS)}")
    return {"enable_thinking": effort not in ("none", "minimal"), "reasoning_effort": effort}


def to_chat_body(body: Any, store: Any = None) -> tuple[dict, ResponsesRequest]:
    """A Responses body as (a chat completions body, what the Responses shape needs). `store`:
    the server's ResponseStore, which `previous_response_id` reads and `store: true` writes."""
    body = check_body(body)
    history: list[dict] = []
    prev_id = body.get("previous_response_id")
    if prev_id is not None:
        if not isinstance(prev_id, str):
            raise bad_request("'previous_response_id' must be a string")
        prev = store.get(prev_id) if store is not None else None
        if prev is None:
            raise ApiError(404, "not_found_error", f"Previous response with id '{prev_id}' not found.",
                           {"param": "previous_response_id"})
        history = copy.deepcopy(prev.messages)  # merged into below; the stored ones stay as they are
    conversation = history + input_messages(body)
    chat = {k: v for k, v in body.items() if k not in RESPONSES_ONLY}
    who = body.get("safety_identifier", body.get("user"))  # the user, for fair scheduling
    if who is not None:
        chat["user"] = who
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string")
    chat["messages"] = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    tools = chat_tools(body)
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None and tools:
        chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    elif isinstance(body.get("tool_choice"), (dict,)) or body.get("tool_choice") == "required":
        raise bad_request("'tool_choice' names a function, but 'tools' has no function tools")
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = get_int(body, "max_output_tokens", -1, lo=-1, hi=2**31 - 1)
    rf = response_format(body.get("text"))
    if rf is not None:
        chat["response_format"] = rf
    kw = thinking_kwargs(body.get("reasoning"))
    if kw:
        given = chat.get("chat_template_kwargs")
        chat["chat_template_kwargs"] = {**kw, **given} if isinstance(given, dict) else kw
    keep = get_bool(body, "store", True)
    echo = {k: body.get(k) for k in ECHOED}
    echo["store"] = keep
    return chat, ResponsesRequest(conversation, store if keep else None, echo,
                                  get_bool(body, "timings_per_token", False),
                                  get_bool(body, "return_progress", False))
