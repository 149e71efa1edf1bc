"""`POST /v1/chat/completions/control`: acting on a running chat completion by its id, as
llama-server's post_control does. The one action is `reasoning_end`: the completion's thinking
block is closed at its next token (the reasoning budget's forcing, llama_lib/reasoning_budget.py).

Each chat request whose template thinks registers its `ReasoningSwitch` under its answer id.
The table holds them weakly: an entry lives as long as its request's parameters do, so it needs
no clean-up. Only a flag crosses threads; the engine thread alone touches the sampler.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from llama_lib.reasoning_budget import ReasoningSwitch

from ..errors import bad_request
from ..fields import check_body, get_str

ACTIONS = ("reasoning_end",)

_lock = threading.Lock()
_switches: "weakref.WeakValueDictionary[str, ReasoningSwitch]" = weakref.WeakValueDictionary()


def register(cmpl_id: str, switch: ReasoningSwitch) -> None:
    """Make a completion reachable by its id (its answer's `id`)."""
    with _lock:
        _switches[cmpl_id] = switch


def control(body: Any) -> dict:
    """The control endpoint's answer: {"success": bool, "message"?: str}; a body without an id
    or with an unknown action is a 400, as upstream; an id with no running completion is a
    200 with success false (llama-server's server_task_result_control)."""
    body = check_body(body)
    cmpl_id = get_str(body, "id") or ""
    action = get_str(body, "action") or ""
    if not cmpl_id:
        raise bad_request("missing completion id")
    if action not in ACTIONS:
        raise bad_request("unknown control action")
    with _lock:
        switch = _switches.get(cmpl_id)
    if switch is None or not switch.live:
        return {"success": False, "message": "no active completion for this id"}
    if not switch.enabled:
        return {"success": False, "message": "reasoning control not enabled for this completion"}
    if not switch.request_end():
        return {"success": False, "message": "no active completion for this id"}
    return {"success": True}
