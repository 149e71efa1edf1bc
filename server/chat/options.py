"""The server's chat options (llama-server's flags `--reasoning`, `--reasoning-effort`,
`--reasoning-preserve`, `--chat-template-kwargs`, `--reasoning-budget(-message)`,
`--skip-chat-parsing`, `--prefill-assistant`) and how a request's fields combine with them
(`template_kwargs`), as server-common.cpp's oaicompat_chat_params_parse does.

Kept apart from render.py so that the command line (config/cli_chat.py) builds one frozen
`ChatOptions` and every chat request reads the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama_lib.reasoning_budget import ReasoningParams, ReasoningSwitch

from ..errors import bad_request
from ..fields import get_bool, get_int, get_str

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ChatOptions:
    """Server-wide chat defaults from the command line."""

    # variables every template render gets (a request's chat_template_kwargs override them):
    # --chat-template-kwargs, and enable_thinking / reasoning_effort / preserve_reasoning set by
    # --reasoning on|off, --reasoning-effort, --(no-)reasoning-preserve
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_budget: int = -1          # --reasoning-budget: -1 unlimited, 0 closes the block at once
    reasoning_budget_message: str = ""  # --reasoning-budget-message: written before the forced end tag
    skip_chat_parsing: bool = False     # --skip-chat-parsing: the answer is content, raw
    prefill_assistant: bool = True      # --no-prefill-assistant: a final assistant turn is a whole turn


DEFAULT_OPTIONS = ChatOptions()


def template_kwargs(body: dict, options: ChatOptions) -> dict[str, Any]:
    """The template's extra variables for one request: the server's, then the request's
    `chat_template_kwargs` over them, then `reasoning_effort` ("none" turns thinking off)."""
    kw = body.get("chat_template_kwargs")
    if kw is not None and not isinstance(kw, dict):
        raise bad_request("chat_template_kwargs must be an object")
    out = {**options.template_kwargs, **(kw or {})}
    if "enable_thinking" in out and not isinstance(out["enable_thinking"], bool):
        if isinstance(out["enable_thinking"], str):
            raise bad_request('invalid type for "enable_thinking" (expected boolean, got string)')
        del out["enable_thinking"]  # llama-server ignores a value that is neither
    if body.get("reasoning_effort") is not None:
        effort = body["reasoning_effort"]
        if not isinstance(effort, str):
            raise bad_request("reasoning_effort must be a string")
        if effort == "none":
            out["enable_thinking"] = False
            out.pop("reasoning_effort", None)
        elif effort:
            out["reasoning_effort"] = effort
    return out


def reasoning_params(body: dict, options: ChatOptions, markers, opened: bool) -> ReasoningParams | None:
    """The thinking block's budget and control for a chat whose template thinks (`markers`,
    None otherwise): `reasoning_budget_tokens` (alias `thinking_budget_tokens`; -1 takes
    --reasoning-budget), `reasoning_budget_message` (else --reasoning-budget-message) and
    `reasoning_control` (the control endpoint may end the block), as server-common.cpp."""
    budget = get_int(body, "reasoning_budget_tokens", -1, lo=-1, hi=INT32_MAX, aliases=("thinking_budget_tokens",))
    message = get_str(body, "reasoning_budget_message", options.reasoning_budget_message) or ""
    control = get_bool(body, "reasoning_control", False)
    if markers is None:
        return None
    return ReasoningParams(start=markers.start, end=markers.end,
                           budget=options.reasoning_budget if budget == -1 else budget,
                           message=message, opened=opened, switch=ReasoningSwitch(enabled=control))


def completion_reasoning(body: dict) -> ReasoningParams | None:
    """/completion's low-level budget fields (server-schema.cpp): `reasoning_budget_tokens`
    with `reasoning_budget_start_tag` and `reasoning_budget_end_tags` (or one
    `reasoning_budget_end_tag`; the first is forced), `reasoning_budget_message`; the block
    opens when the model writes the start tag."""
    start = get_str(body, "reasoning_budget_start_tag") or ""
    tags = body.get("reasoning_budget_end_tags")
    if tags is None:
        one = get_str(body, "reasoning_budget_end_tag")
        tags = [one] if one else []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise bad_request("reasoning_budget_end_tags must be a list of strings")
    tags = [t for t in tags if t]
    budget = get_int(body, "reasoning_budget_tokens", -1, lo=-1, hi=INT32_MAX)
    message = get_str(body, "reasoning_budget_message", "") or ""
    if not start or not tags or budget < 0:
        return None
    return ReasoningParams(start=start, end=tags[0], budget=budget, message=message, other_ends=tuple(tags[1:]))
