"""How a model writes tool calls: detected from its chat template, parsed out of the generated
text (also while it streams), and enforced by a grammar.

Formats (the one a template uses is picked from its text, as llama.cpp picks one):

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
  (Qwen 2.5 / 3, QwQ, Hermes 2 Pro / 3, SmolLM3).
- llama3: the answer is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>` (Llama 3.1 / 3.2 / 3.3); "arguments" and `"type": "function"` are read too.
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral Nemo);
  mistral-args: `[TOOL_CALLS]name[ARGS]{...}` per call (Mistral Small 3.2, Devstral, Ministral).
- granite: `<|tool_call|>[{"name": ..., "arguments": {...}}, ...]` (Granite 3.x).
- generic, for every other template (and the transcript): the whole answer is a JSON object,
  `{"tool_call": {"name": ..., "arguments": {...}}}`, `{"tool_calls": [...]}` or
  `{"response": "..."}`; the prompt describes it (GENERIC_SYSTEM_TEXT).

A format gives (1) `parse(text, final)`: the content and the calls so far, never taking back
what an earlier, shorter text gave (a stream sends only what grows); (2) `grammar(tools,
parallel)`: GBNF for the calls, built by the project's JSON Schema converter from each tool's
parameters; (3) `triggers`: where a lazy grammar (tool_choice "auto") starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from llama_lib.gbnf import gbnf_literal
from llama_lib.json_schema import schemas_to_grammar

from .json_scan import Incomplete, Invalid, partial_string, scan_object, skip_ws, value_end


@dataclass
class ParsedCall:
    name: str
    arguments: str  # the JSON text of the arguments as far as it is written
    complete: bool = False
    whole_name: bool = True  # False: `name` is the start of a name still being written


@dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class NotACall(Exception):
    """The text at a call marker is not a call after all: it stays content."""


def tool_name(tool: dict) -> str:
    return tool["function"]["name"]


def tool_parameters(tool: dict) -> Any:
    p = tool["function"].get("parameters")
    return p if p else {"type": "object"}


def _q(key: str) -> str:
    """GBNF for a JSON key or string constant and its trailing whitespace."""
    return gbnf_literal(json.dumps(key, ensure_ascii=False)) + " space"


def _held(text: str, markers: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class ToolFormat:
    name = "generic"
    args_key = "arguments"
    markers: tuple[str, ...] = ()  # texts that start a call: held back while they may be one
    lazy = True                    # "auto" can leave the text free until a trigger

    shown: tuple[str, ...] = ()   # further texts of the format the output must show

    @property
    def preserved(self) -> tuple[str, ...]:
        """Texts the output must show even when they are special tokens (llama-server's
        preserved_tokens): the format's markers."""
        return self.markers + self.shown

    @property
    def triggers(self) -> list[str]:
        return [re.escape(m) for m in self.markers]

    # -- grammar -------------------------------------------------------------------------

    def call_object(self, name: str, args_rule: str) -> str:
        """GBNF of the JSON object of one call."""
        return (f'"{{" space {_q("name")} ":" space {_q(name)} "," space '
                f'{_q(self.args_key)} ":" space {args_rule} "}}" space')

    def forced_opening(self, names: tuple[str, ...]) -> str:
        """The text every answer of a forced call begins with, under this format's grammar and
        as its template writes it ("" when there is none): the prompt can carry it, decoded in
        one batch, instead of the model writing it a step a token. With one tool its name and
        the arguments key are fixed too."""
        return ""

    def calls_rule(self, tools: list, rules: list[str], parallel: bool, auto: bool = False) -> str:
        """The GBNF body of the calls region, given each tool's arguments rule (`auto`: the
        model may also answer without a call, where the format is not lazy)."""
        raise NotImplementedError

    def grammar(self, tools: list, parallel: bool, auto: bool = False, schemas: list | None = None) -> str:
        """GBNF for one call (or, with `parallel`, one or more) of these tools, whose arguments
        follow `schemas` (default: each tool's parameters). Raises ValueError for a schema the
        converter refuses."""
        if schemas is None:
            schemas = [tool_parameters(t) for t in tools]
        try:
            return schemas_to_grammar(schemas, lambda rules: self.calls_rule(tools, rules, parallel, auto))
        except RecursionError:
            raise ValueError("a tool's parameters schema is nested too deeply") from None

    # -- parsing -------------------------------------------------------------------------

    def parse(self, text: str, final: bool) -> Parsed:
        """Content and calls of the text so far; `final`: nothing more will come."""
        parts: list[str] = []
        calls: list[ParsedCall] = []
        pos = 0
        while True:
            k, marker = self.find_start(text, pos)
            if k < 0:
                tail = text[pos:]
                if not final:
                    tail = tail[:len(tail) - _held(tail, self.markers)]
                parts.append(tail)
                break
            parts.append(text[pos:k])
            try:
                got, end = self.read_calls(text, k + len(marker), final)
            except NotACall:
                parts.append(text[k:])
                break
            calls.extend(got)
            if end is None:
                break
            pos = end
        content = parts[0] + "".join(p for p in parts[1:] if p.strip())
        if calls or not final:
            content = content.rstrip()
        return Parsed(content, calls)

    def find_start(self, text: str, pos: int) -> tuple[int, str]:
        best = (-1, "")
        for m in self.markers:
            k = text.find(m, pos)
            if k >= 0 and (best[0] < 0 or k < best[0]):
                best = (k, m)
        return best

    def read_calls(self, text: str, i: int, final: bool) -> tuple[list[ParsedCall], int | None]:
        """The calls after a marker ending at i, and where the text goes on (None: the calls
        are still being written). Raises NotACall."""
        raise NotImplementedError

    def read_object(self, text: str, i: int, final: bool) -> tuple[ParsedCall | None, int | None]:
        """One call object at text[i] (after whitespace): the call once its name is known, and
        the index after the object (None while open)."""
        j = skip_ws(text, i)
        if j >= len(text):  # a marker the text ends with: a call cut before it began
            return None, None
        if text[j] != "{":
            raise NotACall
        try:
            scan = scan_object(text, j)
        except Invalid:
            raise NotACall from None
        name_m = scan.get("name")
        fn = scan.get("function")
        if name_m is None and fn is not None and fn.end is not None:
            # {"type": "function", "function": {"name": ..., "arguments": ...}}
            inner, _ = self.read_object(text, fn.start, True)
            return inner, scan.end
        if name_m is None or name_m.end is None:
            if scan.end is not None:
                raise NotACall
            if scan.members and scan.members[0].key not in ("name", "type", "function", "arguments", "parameters"):
                raise NotACall
            if name_m is not None and text.startswith('"', name_m.start):
                # the name is being written: its start, for a reader that knows the offered names
                return ParsedCall(partial_string(text[name_m.start + 1:]), "", whole_name=False), None
            # still open: being written, or (final) cut before its name was whole (max_tokens):
            # markup of a call that never was, shown neither as a call nor as text
            return None, None
        name = json.loads(text[name_m.start:name_m.end])
        if not isinstance(name, str) or not name:
            raise NotACall
        args_m = scan.get(self.args_key) or scan.get("arguments") or scan.get("parameters")
        if args_m is None:
            args = "{}" if scan.end is not None else ""
        else:
            args = text[args_m.start:args_m.end if args_m.end is not None else len(text)]
            if args_m.end is None:
                args = args.rstrip()
            elif args.startswith('"'):  # arguments sent as a JSON string holding the object
                try:
                    inner = json.loads(args)
                    json.loads(inner)
                    args = inner
                except ValueError:
                    pass
        # cut off (finish_reason "length"): still a call, as the stream already showed it
        return ParsedCall(name, args, scan.end is not None), scan.end

    def read_array(self, text: str, i: int, final: bool) -> tuple[list[ParsedCall], int | None]:
        """`[call, call, ...]` at text[i] (after whitespace)."""
        j = skip_ws(text, i)
        if j >= len(text):
            if final:
                raise NotACall
            return [], None
        if text[j] != "[":
            raise NotACall
        return self.read_objects(text, skip_ws(text, j + 1), final, close="]")

    def read_objects(self, text: str, j: int, final: bool, close: str | None = None):
        """Call objects separated by "," up to `close` (an array's "]"), or by ";" (no close:
        the calls end where no ";" follows)."""
        calls: list[ParsedCall] = []
        sep = "," if close else ";"
        while True:
            call, end = self.read_object(text, j, final)
            if call is not None:
                calls.append(call)
            if end is None:
                return calls, None
            j = skip_ws(text, end)
            if close and text.startswith(close, j):
                return calls, j + 1
            if not text.startswith(sep, j):
                if close is None:
                    return calls, j
                if j >= len(text):
                    return calls, (j if final else None)
                raise NotACall
            j += 1


class Hermes(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    end_marker = "</tool_call>"
    shown = (end_marker,)

    def forced_opening(self, names):
        head = '<tool_call>\n{"name": "'
        if len(names) != 1:
            return head
        return head + json.dumps(names[0], ensure_ascii=False)[1:-1] + '", "arguments": '

    def calls_rule(self, tools, rules, parallel, auto=False):
        one = " | ".join(self.call_object(tool_name(t), r) for t, r in zip(tools, rules))
        block = f'"<tool_call>" space ({one}) "</tool_call>"'
        return f'{block} (space {block})*' if parallel else block

    def read_calls(self, text, i, final):
        call, end = self.read_object(text, i, final)
        if end is None:
            return ([call] if call else []), None
        j = skip_ws(text, end)
        rest = text[j:]
        if rest.startswith(self.end_marker):
            return [call], j + len(self.end_marker)
        if not final and self.end_marker.startswith(rest):
            return [call], None
        return [call], j  # a missing closing tag: the call stands, the rest is content


class Llama3(ToolFormat):
    name = "llama3"
    args_key = "parameters"
    markers = ("<|python_tag|>",)

    @property
    def triggers(self):
        return [r"<\|python_tag\|>", r'^\s*(\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name")']

    def calls_rule(self, tools, rules, parallel, auto=False):
        one = " | ".join(self.call_object(tool_name(t), r) for t, r in zip(tools, rules))
        return f'"<|python_tag|>"? ({one})' + (f' (";" space ({one}))*' if parallel else "")

    def find_start(self, text, pos):
        if pos == 0:
            j = skip_ws(text, 0)
            if text.startswith("{", j):
                return j, ""
        return super().find_start(text, pos)

    def read_calls(self, text, i, final):
        return self.read_objects(text, i, final)


class Mistral(ToolFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def calls_rule(self, tools, rules, parallel, auto=False):
        one = " | ".join(self.call_object(tool_name(t), r) for t, r in zip(tools, rules))
        more = f' ("," space ({one}))*' if parallel else ""
        return f'"[TOOL_CALLS]" "[" space ({one}){more} "]"'

    def read_calls(self, text, i, final):
        return self.read_array(text, i, final)


class MistralArgs(ToolFormat):
    name = "mistral-args"
    markers = ("[TOOL_CALLS]",)
    shown = ("[ARGS]",)  # between a call's name and its arguments

    def calls_rule(self, tools, rules, parallel, auto=False):
        one = " | ".join(f'{gbnf_literal(tool_name(t))} "[ARGS]" {r}' for t, r in zip(tools, rules))
        block = f'"[TOOL_CALLS]" ({one})'
        return f"{block}+" if parallel else block

    def read_calls(self, text, i, final):
        k = text.find("[ARGS]", i)
        if k < 0:
            head = text[i:len(text) - _held(text[i:], ("[ARGS]",))]
            if final or len(text) - i > 128 or not re.fullmatch(r"[\w.-]*", head):
                raise NotACall
            return [], None
        name = text[i:k].strip()
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise NotACall
        j = skip_ws(text, k + len("[ARGS]"))
        try:
            end = value_end(text, j)
        except Incomplete:
            return [ParsedCall(name, text[j:].rstrip())], None
        except Invalid:
            raise NotACall from None
        return [ParsedCall(name, text[j:end], True)], end


class Granite(Mistral):
    name = "granite"
    markers = ("<|tool_call|>",)

    def calls_rule(self, tools, rules, parallel, auto=False):
        return super().calls_rule(tools, rules, parallel, auto).replace('"[TOOL_CALLS]"', '"<|tool_call|>"', 1)


GENERIC_SYSTEM_TEXT = (
    "You can call these tools:\n{tools}\n\n"
    "Answer with one JSON object: either {{\"tool_call\": {{\"name\": <tool name>, \"arguments\": "
    "<its arguments object>}}}}{parallel} to call a tool, or {{\"response\": <your answer as a string>}}."
)


class Generic(ToolFormat):
    """The whole answer is one JSON object (see the module docstring); with tools the
    grammar always applies, for "auto" too (a `response` alternative is added)."""

    name = "generic"
    lazy = False

    @property
    def triggers(self):
        return []

    def calls_rule(self, tools, rules, parallel, auto=False):
        one = " | ".join(self.call_object(tool_name(t), r) for t, r in zip(tools, rules))
        alts = [f'"{{" space {_q("tool_call")} ":" space ({one}) "}}" space']
        if parallel:
            alts.append(f'"{{" space {_q("tool_calls")} ":" space "[" space ({one}) ("," space ({one}))* "]" space "}}" space')
        if auto:
            alts.append(f'"{{" space {_q("response")} ":" space string "}}" space')
        return " | ".join(alts)

    def system_text(self, tools: list, parallel: bool) -> str:
        listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        more = ' (or {"tool_calls": [<call>, ...]} for several calls)' if parallel else ""
        return GENERIC_SYSTEM_TEXT.format(tools=listed, parallel=more)

    def parse(self, text, final):
        as_text = Parsed(text if final else text.rstrip())  # not the JSON answer: plain content
        j = skip_ws(text, 0)
        if j >= len(text) or text[j] != "{":
            return as_text if j < len(text) or final else Parsed("")
        try:
            scan = scan_object(text, j)
        except Invalid:
            return as_text
        if not scan.members:
            return as_text if final else Parsed("")
        first = scan.members[0]
        try:
            if first.key == "response":
                raw = text[first.start:first.end or len(text)]
                if not raw.startswith('"'):
                    raise NotACall
                said = json.loads(raw) if first.end is not None else partial_string(raw[1:])
                return Parsed(said if isinstance(said, str) else raw)
            if first.key == "tool_call":
                call, _ = self.read_object(text, first.start, final)
                return Parsed("", [call] if call else [])
            if first.key == "tool_calls":
                calls, _ = self.read_array(text, first.start, final)
                return Parsed("", calls)
        except NotACall:
            pass
        return as_text


FORMATS = {f.name: f for f in (Hermes(), Llama3(), Mistral(), MistralArgs(), Granite(), Generic())}


def detect_format(template_text: str | None) -> ToolFormat:
    """The format a chat template's text (Jinja source) writes tool calls in."""
    t = template_text or ""
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral-args" if "[ARGS]" in t else "mistral"]
    if "<tool_call>" in t and "<function=" not in t:
        return FORMATS["hermes"]
    if "<|tool_call|>" in t:
        return FORMATS["granite"]
    if "<|python_tag|>" in t or ("ipython" in t and '"parameters"' in t):
        return FORMATS["llama3"]
    return FORMATS["generic"]
