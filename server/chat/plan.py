"""A chat request's tools, tool_choice and reasoning: what to tell the template, which grammar
constrains the answer, and how the answer is read back (server/chat/output.py).

OpenAI's promises, kept by a grammar built from the tools' JSON Schemas (tool_formats.py):
`tool_choice: "required"` or a named function always yields a call, in the template's format,
whose arguments match the schema (a schema the converter cannot express is a 400 naming
`tools[i].function.parameters`); `"auto"` lets the model write text, and a lazy grammar takes
over from the format's opening marker (schemas it cannot express then allow any object);
`"none"` renders the tools but neither constrains nor parses calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import bad_request
from ..fields import get_bool
from .reasoning import REASONING_FORMATS, ThinkMarkers, detect_markers, prompt_opens
from llama_lib.gbnf import gbnf_literal
from llama_lib.json_schema import schemas_to_grammar

from .tool_formats import FORMATS, ToolFormat, detect_format, tool_name, tool_parameters

TOOL_CHOICES = ("auto", "none", "required")


@dataclass
class ChatPlan:
    """How one chat answer is constrained and read."""

    fmt: ToolFormat | None = None        # parse calls in this format (None: no tools / "none")
    tool_names: tuple[str, ...] = ()
    parallel: bool = False
    grammar: str | None = None           # GBNF of the calls ("auto": lazy, from the triggers)
    lazy: bool = False
    triggers: tuple[str, ...] = ()
    markers: ThinkMarkers | None = None  # the template's thinking markers
    opened: bool = False                 # the prompt ends inside a thinking block
    reasoning_format: str = "auto"
    system_text: str | None = None       # the generic format's description of the tools
    prefill: str = ""                    # a forced call's fixed opening, decoded with the prompt

    def rendered(self, prompt: str) -> None:
        """What the rendered prompt decides: whether the answer starts inside a thinking block
        (DeepSeek R1's "<think>\\n"), and so how a grammar that applies from the first token lets
        a reasoning model think first (and, when the block is open, makes it close it)."""
        self.opened = prompt_opens(prompt, self.markers)
        if self.grammar and not self.lazy and self.markers is not None:
            self.grammar = allow_thinking(self.grammar, self.markers, self.opened)

    @property
    def preserved(self) -> tuple[str, ...]:
        """Marker texts the answer must show even when they are special tokens."""
        out = self.fmt.preserved if self.fmt is not None else ()
        if self.markers is not None and self.reasoning_format != "none":
            out += (self.markers.start, self.markers.end)
        return out

    @property
    def active(self) -> bool:
        """Does the answer need reading (calls or reasoning), or is it plain content?"""
        return self.fmt is not None or (self.markers is not None and self.reasoning_format != "none")


def tool_choice(body: dict, tools: list | None) -> str:
    """"auto", "none", "required", or the name of the one function to call."""
    v = body.get("tool_choice")
    if v is None:
        return "auto" if tools else "none"
    if isinstance(v, str):
        if v not in TOOL_CHOICES:
            raise bad_request(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function, got {v!r}")
        choice = v
    elif isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict) \
            and isinstance(v["function"].get("name"), str):
        choice = v["function"]["name"]
        if not tools or choice not in {tool_name(t) for t in tools}:
            raise bad_request(f"tool_choice names the function {choice!r}, which is not in tools")
        return choice
    else:
        raise bad_request('tool_choice must be a string or {"type": "function", "function": {"name": ...}}')
    if choice == "required" and not tools:
        raise bad_request('tool_choice "required" needs tools')
    return choice


def check_tool_turns(messages: list[dict]) -> None:
    """Assistant tool calls must be well formed, and every tool message must answer a call
    made before it (by its tool_call_id when the calls have ids)."""
    ids: set[str] = set()
    called = False
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise bad_request(f"messages[{i}].tool_calls must be a list on an assistant message")
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise bad_request(f"messages[{i}].tool_calls[{j}].function.name must be a non-empty string")
                if not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON string")
                if isinstance(c.get("id"), str):
                    ids.add(c["id"])
                called = True
        if m["role"] == "tool":
            tid = m.get("tool_call_id")
            if not called:
                raise bad_request(f"messages[{i}] is a tool result, but no assistant tool call comes before it")
            if ids and tid is not None and tid not in ids:
                raise bad_request(f"messages[{i}].tool_call_id {tid!r} does not match any earlier tool call")


def reasoning_format(body: dict, default: str) -> str:
    v = body.get("reasoning_format")
    if v is None:
        return default
    if v not in REASONING_FORMATS:
        raise bad_request(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}")
    return v


def plan_chat(body: dict, template, tools: list | None, messages: list[dict],
              default_reasoning: str = "auto", pure: bool = False) -> ChatPlan:
    """The plan of a chat request (before rendering: the generic format adds a system text).
    `pure` (--skip-chat-parsing): the answer is all content, no calls grammar, nothing parsed."""
    check_tool_turns(messages)
    choice = tool_choice(body, tools)
    if pure:
        return ChatPlan(reasoning_format=reasoning_format(body, default_reasoning))
    caps = getattr(template, "caps", {}) or {}
    text = getattr(template, "text", "") if getattr(template, "kind", "") == "jinja" else ""
    plan = ChatPlan(markers=detect_markers(text) if text else None,
                    reasoning_format=reasoning_format(body, default_reasoning))
    if not tools or choice == "none":
        return plan
    fmt = detect_format(text)
    if fmt.name != "generic" and not caps.get("supports_tools", True):
        fmt = FORMATS["generic"]
    default_parallel = bool(caps.get("supports_parallel_tool_calls", fmt.name == "generic"))
    parallel = get_bool(body, "parallel_tool_calls", default_parallel)
    chosen = tools if choice in ("auto", "required") else [t for t in tools if tool_name(t) == choice]
    forced = choice != "auto"
    schemas = []  # "auto": a schema we cannot express (not an invalid one) allows any object
    for t in chosen:
        schema = tool_parameters(t)
        try:
            schemas_to_grammar([schema], lambda n: n[0])
        except (ValueError, RecursionError) as e:
            if forced or not _unsupported(e):
                i = next(k for k, u in enumerate(tools) if u is t)
                raise bad_request(f"tools[{i}].function.parameters: {e or 'nested too deeply'}") from None
            schema = {"type": "object"}
        schemas.append(schema)
    grammar = fmt.grammar(chosen, parallel, auto=not forced, schemas=schemas)
    plan.fmt, plan.tool_names, plan.parallel, plan.grammar = fmt, tuple(tool_name(t) for t in chosen), parallel, grammar
    if not forced and fmt.lazy:
        plan.lazy, plan.triggers = True, tuple(fmt.triggers)
    elif forced and plan.markers is None:  # (a reasoning model may think before its call)
        plan.prefill = fmt.forced_opening(plan.tool_names)
    if fmt.name == "generic" and (not caps.get("supports_tools") or not text):
        plan.system_text = fmt.system_text(chosen, parallel)
    return plan


def _not_containing(text: str) -> str:
    """GBNF for any text in which `text` does not occur (up to its last character)."""
    alts = []
    for k, ch in enumerate(text):
        head = gbnf_literal(text[:k]) + " " if k else ""
        alts.append(f"{head}[^\\x{ord(ch):02X}]" if ord(ch) < 256 else f"{head}[^{ch}]")
    return "(" + " | ".join(alts) + ")*"


def allow_thinking(grammar: str, markers: ThinkMarkers, opened: bool) -> str:
    """The calls grammar with a thinking block in front: optional, or when the prompt opened
    the block, its rest and the closing marker first."""
    head, rest = grammar.split("\n", 1)
    body = head.removeprefix("root ::= ")
    think = f"tc-think-body {gbnf_literal(markers.end)} space"
    lead = think if opened else f"({gbnf_literal(markers.start)} space {think})?"
    return f"root ::= {lead} ({body})\ntc-think-body ::= {_not_containing(markers.end)}\n{rest}"


def _unsupported(e: Exception) -> bool:
    """A valid schema the converter cannot express (as opposed to a malformed one)."""
    msg = str(e)
    return isinstance(e, RecursionError) or "supported" in msg or "more than" in msg


def with_system_text(messages: list[dict], text: str | None) -> list[dict]:
    """Messages with the generic format's tool description in front of (or merged into) the
    system message."""
    if not text:
        return messages
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{text}".lstrip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]

