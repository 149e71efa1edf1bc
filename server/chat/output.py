"""A chat answer read as it is generated: reasoning, content and tool calls, in OpenAI's shapes.

The generated text goes through two readers, thinking markers (server/chat/reasoning.py) then the
template's tool-call format (server/chat/tool_formats.py); both give, for any text so far, parts
that only grow. `ChatOutput.deltas` sends the growth as `delta.reasoning_content`,
`delta.content` and `delta.tool_calls` fragments (each call first with its index, id, type and
name, then pieces of its arguments); `ChatOutput.message` is the whole answer at the end, the
same text the deltas add up to.
"""

from __future__ import annotations

import secrets
import string

from .plan import ChatPlan
from .reasoning import split_reasoning
from .tool_formats import Parsed, ParsedCall

_ALNUM = string.ascii_letters + string.digits


def new_call_id(fmt_name: str) -> str:
    """A tool call's id. Mistral's templates require exactly 9 letters or digits."""
    n = 9 if fmt_name.startswith("mistral") else 24
    prefix = "" if fmt_name.startswith("mistral") else "call_"
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


class ChatOutput:
    """The reader of one chat answer (one choice)."""

    def __init__(self, plan: ChatPlan):
        self.plan = plan
        self._sent_reasoning = 0
        self._sent_content = 0
        self._ids: list[str] = []
        self._sent_args: list[int] = []

    def parts(self, text: str, final: bool) -> tuple[str, Parsed]:
        """(reasoning, content and calls) of the text so far."""
        p = self.plan
        text = p.prefill + text  # the opening the prompt carried is the answer's too
        reasoning, rest = split_reasoning(text, p.markers, p.opened, final, p.reasoning_format)
        if p.fmt is None:
            return reasoning, Parsed(rest)
        parsed = p.fmt.parse(rest, final)
        kept = [c for c in map(self._named, parsed.calls) if c is not None]
        if len(kept) != len(parsed.calls) or any(a is not b for a, b in zip(kept, parsed.calls)):
            parsed = Parsed(parsed.content, kept)
        return reasoning, parsed

    def _named(self, call: ParsedCall) -> ParsedCall | None:
        """The call as the client may see it: a tool that was not offered is not a call, and a
        name still being written is known as soon as the grammar leaves one offered name it
        can become (the stream's tool_use block starts steps before the name's last token)."""
        names = self.plan.tool_names
        if call.whole_name:
            return call if not names or call.name in names else None
        if not self.plan.grammar:
            return None
        fits = [n for n in names if n.startswith(call.name)]
        return ParsedCall(fits[0], call.arguments) if len(fits) == 1 else None

    def _id(self, i: int) -> str:
        while len(self._ids) <= i:
            self._ids.append(new_call_id(self.plan.fmt.name if self.plan.fmt else ""))
            self._sent_args.append(-1)  # -1: the call's header is not sent yet
        return self._ids[i]

    def deltas(self, text: str, final: bool = False) -> list[dict]:
        """The deltas that bring the client from what it has to `text`."""
        reasoning, parsed = self.parts(text, final)
        out: list[dict] = []
        if len(reasoning) > self._sent_reasoning:
            out.append({"reasoning_content": reasoning[self._sent_reasoning:]})
            self._sent_reasoning = len(reasoning)
        if len(parsed.content) > self._sent_content:
            out.append({"content": parsed.content[self._sent_content:]})
            self._sent_content = len(parsed.content)
        for i, call in enumerate(parsed.calls):
            cid = self._id(i)
            if self._sent_args[i] < 0:
                out.append({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
                self._sent_args[i] = 0
            if len(call.arguments) > self._sent_args[i]:
                frag = call.arguments[self._sent_args[i]:]
                out.append({"tool_calls": [{"index": i, "function": {"arguments": frag}}]})
                self._sent_args[i] = len(call.arguments)
        return out

    def message(self, text: str) -> dict:
        """The whole assistant message of the finished text."""
        reasoning, parsed = self.parts(text, True)
        msg: dict = {"role": "assistant", "content": parsed.content if parsed.content or not parsed.calls else None}
        if reasoning:
            msg["reasoning_content"] = reasoning
        if parsed.calls:
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments},
                                  "id": self._id(i)} for i, c in enumerate(parsed.calls)]
        return msg

    @property
    def sent_calls(self) -> bool:
        """Did the deltas so far carry a tool call?"""
        return bool(self._ids)
