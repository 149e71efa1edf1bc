"""Reading JSON that is still being generated: where a value ends, or whether it still can.

A tool call streams while the model writes it, so its parser (server/chat/tool_formats.py) must tell
three cases apart at every token: a complete JSON value (and where it ends), the beginning of
one (wait), or text that can never become JSON (it was not a call after all). `json` alone
cannot: it only reads complete texts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_WS = " \t\n\r"
_LITERALS = ("true", "false", "null")
_NUMBER_CHARS = set("0123456789+-.eE")


class Invalid(ValueError):
    """The text cannot be (the beginning of) a JSON value."""


class Incomplete(Exception):
    """The text ends inside the value."""


@dataclass
class Member:
    """One key of an object and where its value lies in the text (end None: still open)."""

    key: str
    start: int
    end: int | None


@dataclass
class ObjectScan:
    """An object read from a possibly unfinished text: its members so far, its end (None while
    open) and, when the text ended inside a key, nothing more."""

    members: list[Member] = field(default_factory=list)
    end: int | None = None

    def get(self, key: str) -> Member | None:
        return next((m for m in self.members if m.key == key), None)


def skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"', re.S)
_STRING_OPEN = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?\Z', re.S)


def _string_end(text: str, i: int) -> int:
    """text[i] is '"': the index after the closing quote (a regex: strings are most of the
    text, and the stream rescans it at every token)."""
    m = _STRING.match(text, i)
    if m:
        return m.end()
    if _STRING_OPEN.match(text, i):
        raise Incomplete
    raise Invalid("control character in a string")


def value_end(text: str, i: int) -> int:
    """The index after the JSON value starting at text[i] (no leading whitespace). Raises
    Incomplete if the text ends first, Invalid if it cannot be JSON. Numbers at the very end
    are Incomplete: another digit may follow."""
    n = len(text)
    if i >= n:
        raise Incomplete
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        close = "}" if c == "{" else "]"
        j = skip_ws(text, i + 1)
        if j < n and text[j] == close:
            return j + 1
        while True:
            if c == "{":
                if j >= n:
                    raise Incomplete
                if text[j] != '"':
                    raise Invalid("expected a key")
                j = skip_ws(text, _string_end(text, j))
                if j >= n:
                    raise Incomplete
                if text[j] != ":":
                    raise Invalid("expected ':'")
                j = skip_ws(text, j + 1)
            j = skip_ws(text, value_end(text, j))
            if j >= n:
                raise Incomplete
            if text[j] == close:
                return j + 1
            if text[j] != ",":
                raise Invalid(f"expected ',' or '{close}'")
            j = skip_ws(text, j + 1)
    for lit in _LITERALS:
        if text.startswith(lit, i):
            return i + len(lit)
        if lit.startswith(text[i:]):
            raise Incomplete
    if c == "-" or c.isdigit():
        j = i
        while j < n and text[j] in _NUMBER_CHARS:
            j += 1
        if j == n:
            raise Incomplete
        try:
            json.loads(text[i:j])
        except ValueError:
            raise Invalid("not a number") from None
        return j
    raise Invalid(f"unexpected {c!r}")


def scan_object(text: str, i: int) -> ObjectScan:
    """The object starting at text[i] ('{'), read as far as the text goes. Raises Invalid
    when it cannot be a JSON object."""
    out = ObjectScan()
    n = len(text)
    if i >= n or text[i] != "{":
        raise Invalid("expected an object")
    j = skip_ws(text, i + 1)
    if j < n and text[j] == "}":
        out.end = j + 1
        return out
    while j < n:
        if text[j] != '"':
            raise Invalid("expected a key")
        try:
            k_end = _string_end(text, j)
        except Incomplete:
            return out
        key = json.loads(text[j:k_end])
        j = skip_ws(text, k_end)
        if j >= n:
            return out
        if text[j] != ":":
            raise Invalid("expected ':'")
        j = skip_ws(text, j + 1)
        if j >= n:
            return out
        member = Member(key, j, None)
        out.members.append(member)
        try:
            member.end = value_end(text, j)
        except Incomplete:
            return out
        j = skip_ws(text, member.end)
        if j >= n:
            return out
        if text[j] == "}":
            out.end = j + 1
            return out
        if text[j] != ",":
            raise Invalid("expected ',' or '}'")
        j = skip_ws(text, j + 1)
    return out


def partial_string(raw: str) -> str:
    """The decoded text of an unfinished JSON string body (after the opening quote): as much
    as is certain (an escape cut in the middle waits)."""
    end = len(raw)
    while end > 0:
        try:
            return json.loads('"' + raw[:end] + '"')
        except ValueError:
            end -= 1
    return ""
