"""Chat messages to a prompt: llama.cpp's templates, or a plain transcript for models without one.

Follows llama-server's prefill rules: a final assistant message is continued (no generation
prompt after it); two assistant messages at the end, or both `add_generation_prompt` and
`continue_final_message`, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from llama_lib import apply_chat_template

from .errors import ApiError, bad_request
from .fields import check_object, get_bool

FALLBACK_TEMPLATE = "transcript"
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# The fallback's stops: the earliest match wins, so "\nUser:" cuts the newline before the turn.
FALLBACK_STOPS = ["\nUser:", "User:"]


def _content_text(content: Any, i: int) -> str:
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
        return "\n".join(parts)  # llama-server joins text parts with a newline
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise bad_request("Expected 'messages' to be an array")
    if not msgs:
        raise bad_request("'messages' must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"messages[{i}].role must be a string")
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    return out


def format_transcript(messages: Sequence[dict], add_assistant: bool = True) -> str:
    """The fallback for models without a chat template (the default Gemma 3 270M base model):
    a plain transcript in llama.cpp's parallel-example style, ending with "Assistant:"."""
    lines = [f"{FALLBACK_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    if add_assistant:
        lines.append("Assistant:")
    return "\n".join(lines)


def format_chat(messages: Sequence[dict], template: str, add_assistant: bool = True) -> str:
    """Messages to a prompt: llama_chat_apply_template with `template` (a built-in name or a
    template text llama.cpp recognises), or the transcript fallback."""
    if template == FALLBACK_TEMPLATE:
        return format_transcript(messages, add_assistant)
    try:
        return apply_chat_template(template, messages, add_assistant=add_assistant)
    except ValueError as e:
        raise ApiError(500, "server_error", str(e)) from None


@dataclass
class ChatPrompt:
    text: str
    prefill: str | None  # the final assistant message being continued, else None


def render_chat(body: Any, template: str) -> ChatPrompt:
    """messages + add_generation_prompt / continue_final_message to a prompt, as llama-server:
    a final assistant message is a prefill the model continues (no generation prompt after
    it); two assistant messages at the end, or both options true, are refused (400)."""
    body = check_object(body)
    messages = parse_messages(body)
    add_gen = get_bool(body, "add_generation_prompt", True)
    cfm = body.get("continue_final_message")
    # llama-server: true, "content" or "reasoning_content" continue; anything else does not
    cont = cfm is True or cfm in ("content", "reasoning_content")
    if not cont and messages[-1]["role"] == "assistant":
        if len(messages) >= 2 and messages[-2]["role"] == "assistant":
            raise bad_request("Cannot have 2 or more assistant messages at the end of the list.")
        cont, add_gen = True, False
    if cont and add_gen:
        raise bad_request("Cannot set both add_generation_prompt and continue_final_message to true.")
    if cont and messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        head = format_chat(messages[:-1], template, add_assistant=True)
        if template == FALLBACK_TEMPLATE and prefill:
            head += " "  # "Assistant: <prefill>", as the transcript writes every turn
        return ChatPrompt(head + prefill, prefill)
    return ChatPrompt(format_chat(messages, template, add_assistant=add_gen), None)
