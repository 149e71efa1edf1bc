"""GBNF building blocks: string literals, character classes, integer ranges, regex patterns.

The pieces of grammar text (llama.cpp's GBNF) that the JSON Schema converter (json_schema.py)
assembles into rules:

- `gbnf_literal(text)`: a quoted literal matching `text` exactly.
- `int_range(lo, hi)`: the canonical decimal forms of the integers in [lo, hi], either bound open.
- `regex_to_gbnf(pattern)`: a JSON Schema `pattern` as GBNF over the contents of a JSON string
  (each character as JSON writes it, escapes included). A regex subset: literals, ., classes,
  \\d \\w \\s (and their negations), \\uXXXX, groups (also (?:...)), |, * + ? {n} {n,} {n,m}
  (lazy and possessive forms match the same). A search, as JSON Schema says, unless anchored
  with ^ and $. The result refers to the rule `char` (one JSON string character), which the
  caller defines. Anything else raises ValueError naming it.
"""

from __future__ import annotations

import json
import re

__all__ = ["gbnf_literal", "int_range", "regex_to_gbnf"]

MAX_GROUP_DEPTH = 100  # regex groups nested deeper are refused (the parser recurses per group)


# -- literals and character classes ----------------------------------------------------------

def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _class_char(o: int) -> str:
    """One code point inside a GBNF [...] class."""
    ch = chr(o)
    if ch in "]\\-^[":
        return "\\" + ch
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02X}"
    if 0xD800 <= o <= 0xDFFF:
        raise ValueError("'pattern': surrogate code points are not supported")
    return ch


def _class(ranges: list[tuple[int, int]], negate: bool = False) -> str:
    parts = []
    for lo, hi in ranges:
        parts.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


# -- integer ranges ---------------------------------------------------------------------------

def _digits_range(a: str, b: str) -> str:
    """GBNF for the digit strings of equal length between a and b (inclusive)."""
    if not a:
        return ""
    if len(a) == 1:
        return f"[{a}-{b}]" if a != b else f'"{a}"'
    if a == "0" * len(a) and b == "9" * len(b):
        # every digit string of this length: one repetition, not a tree of alternatives (the
        # expansion doubles with each digit, 10**19 made 18 MB of grammar)
        return f"[0-9]{{{len(a)}}}"
    if a[0] == b[0]:
        return f'"{a[0]}" ' + _digits_range(a[1:], b[1:])
    n = len(a) - 1
    alts = [f'"{a[0]}" ' + _digits_range(a[1:], "9" * n)]
    if int(a[0]) + 1 <= int(b[0]) - 1:
        lo, hi = int(a[0]) + 1, int(b[0]) - 1
        alts.append((f"[{lo}-{hi}]" if lo != hi else f'"{lo}"') + f" [0-9]{{{n}}}")
    alts.append(f'"{b[0]}" ' + _digits_range("0" * n, b[1:]))
    return "(" + " | ".join(alts) + ")"


def _uint_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the canonical decimal forms of lo <= n <= hi (hi None: no bound), n >= 0."""
    alts = []
    d = len(str(lo))
    while True:
        first = 0 if d == 1 else 10 ** (d - 1)
        last = 10 ** d - 1
        a, b = max(lo, first), last if hi is None else min(hi, last)
        if hi is not None and a > hi:
            break
        if hi is None and a == first and d > 1:
            alts.append(f"[1-9] [0-9]{{{d - 1},}}")  # every number with d or more digits
            break
        if a <= b:
            alts.append(_digits_range(str(a), str(b)))
        d += 1
        if hi is None and d > 19:
            alts.append(f"[1-9] [0-9]{{{d - 1},}}")
            break
    return alts


def int_range(lo: int | None, hi: int | None) -> str:
    """GBNF (without trailing space) for the integers in [lo, hi], either bound may be None."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"'minimum' {lo} is above 'maximum' {hi}: no integer fits")
    alts: list[str] = []
    # negative numbers: "-" then a magnitude in [max(1, -hi), -lo]
    if lo is None or lo < 0:
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        mag_hi = None if lo is None else -lo
        alts += ['"-" ' + a for a in _uint_range(mag_lo, mag_hi)]
    if hi is None or hi >= 0:
        alts += _uint_range(max(0, lo if lo is not None else 0), hi)
    return "(" + " | ".join(alts) + ")"


# -- regex patterns ---------------------------------------------------------------------------

_SPECIALS = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_SHORTHANDS = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
               "s": [(0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20)]}
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "f": 0x0C, "v": 0x0B}


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for c_lo, c_hi in cut:
            nxt = []
            for p_lo, p_hi in pieces:
                if c_hi < p_lo or c_lo > p_hi:
                    nxt.append((p_lo, p_hi))
                    continue
                if p_lo < c_lo:
                    nxt.append((p_lo, c_lo - 1))
                if c_hi < p_hi:
                    nxt.append((c_hi + 1, p_hi))
            pieces = nxt
        out += pieces
    return out


def _escaped_char(o: int) -> str:
    """GBNF for the JSON escape of code point o (one of the characters JSON must escape)."""
    return gbnf_literal(json.dumps(chr(o), ensure_ascii=False)[1:-1])


def _set_expr(ranges: list[tuple[int, int]], negate: bool) -> str:
    """GBNF matching the JSON encoding of one character of a regex class."""
    if negate:
        # everything but `ranges`: plain chars minus the specials, plus the escaped specials
        alts = [_class(ranges + _SPECIALS, negate=True)]
        for lo, hi in _subtract(_SPECIALS, ranges):
            alts += [_escaped_char(o) for o in range(lo, hi + 1)]
        return "(" + " | ".join(alts) + ")"
    plain = _subtract(ranges, _SPECIALS)
    if len(plain) == 1 and plain[0][0] == plain[0][1]:
        alts = [gbnf_literal(chr(plain[0][0]))]
    else:
        alts = [_class(plain)] if plain else []
    for lo, hi in ranges:
        for c_lo, c_hi in _SPECIALS:
            for o in range(max(lo, c_lo), min(hi, c_hi) + 1):
                alts.append(_escaped_char(o))
    if not alts:
        raise ValueError("'pattern': empty character class")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def regex_to_gbnf(pattern: str) -> str:
    """GBNF for the contents of a JSON string (between the quotes) that `pattern` matches."""
    return _Regex(pattern).parse()


class _Regex:
    """A recursive-descent translation of a regex subset into GBNF over JSON string contents."""

    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0
        self.depth = 0

    def error(self, what: str) -> ValueError:
        return self.fail(f"{what} is not supported")

    def fail(self, why: str) -> ValueError:
        return ValueError(f"'pattern' {self.p!r}: {why}")

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def parse(self) -> str:
        p = self.p
        head = "" if p.startswith("^") else "char* "
        if p.startswith("^"):
            self.i = 1
        body = self.alternation()
        tail = ""
        if self.peek() == "$":
            self.i += 1
        else:
            tail = " char*"
        if self.i != len(p):
            raise self.error(f"{p[self.i]!r} at position {self.i}")
        return f"{head}({body}){tail}"

    def alternation(self) -> str:
        alts = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.sequence())
        return alts[0] if len(alts) == 1 else " | ".join(alts)

    def sequence(self) -> str:
        items = []
        while self.peek() and self.peek() not in "|)":
            if self.peek() == "$":
                if self.i == len(self.p) - 1:
                    break
                raise self.error("'$' inside the pattern")
            atom = self.atom()
            items.append(self.quantified(atom))
        return " ".join(items) if items else '""'

    def quantified(self, atom: str) -> str:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            q = c
        elif c == "{":
            m = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.p, self.i)
            if not m:
                raise self.error("'{' that is not a repetition")
            self.i = m.end()
            lo = m.group(1)
            if m.group(2) is None:
                q = f"{{{lo}}}"
            else:
                q = f"{{{lo},{m.group(3)}}}"
        else:
            return atom
        if self.peek() in ("?", "+"):  # lazy / possessive: same language
            self.i += 1
        if self.peek() in ("*", "+", "?", "{"):
            raise self.error("a repeated quantifier")
        return f"({atom}){q}"

    def atom(self) -> str:
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("group syntax '(?'")
            if self.depth >= MAX_GROUP_DEPTH:
                raise self.fail(f"groups nested more than {MAX_GROUP_DEPTH} deep")
            self.depth += 1
            inner = self.alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.fail("unbalanced parentheses")
            self.i += 1
            return f"({inner})"
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return "char"
        if c in "*+?{":
            raise self.fail(f"nothing to repeat at position {self.i}")
        if c == "^":
            raise self.error("'^' inside the pattern")
        if c == "\\":
            ranges, negate = self.escape()
            if ranges is None:
                raise self.error(f"escape '\\{self.p[self.i - 1]}'")
            return _set_expr(ranges, negate)
        self.i += 1
        return _set_expr([(ord(c), ord(c))], False)

    def escape(self) -> tuple[list[tuple[int, int]] | None, bool]:
        """After a backslash: (ranges, negated) or (None, _) for an unsupported escape."""
        self.i += 1
        c = self.peek()
        if not c:
            raise self.fail("trailing backslash")
        self.i += 1
        if c.lower() in _SHORTHANDS:
            return list(_SHORTHANDS[c.lower()]), c.isupper()
        if c in _ESCAPES:
            return [(_ESCAPES[c], _ESCAPES[c])], False
        if c == "u":
            m = re.compile(r"[0-9a-fA-F]{4}").match(self.p, self.i)
            if not m:
                return None, False
            self.i = m.end()
            o = int(m.group(0), 16)
            return [(o, o)], False
        if not c.isalnum():
            return [(ord(c), ord(c))], False
        return None, False

    def char_class(self) -> str:
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                r, neg = self.escape()
                if r is None or neg:
                    raise self.error("this escape inside a class")
                if len(r) != 1 or r[0][0] != r[0][1]:
                    ranges += r
                    continue
                lo = r[0][0]
            else:
                self.i += 1
                lo = ord(c)
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                if self.peek() == "\\":
                    r, neg = self.escape()
                    if r is None or neg or len(r) != 1 or r[0][0] != r[0][1]:
                        raise self.error("this range end inside a class")
                    hi = r[0][0]
                else:
                    hi = ord(self.peek())
                    self.i += 1
                if hi < lo:
                    raise self.fail("bad range in a character class")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return _set_expr(ranges, negate)
