"""Bounds on a GBNF text, checked in Python before libllama's grammar parser sees it.

llama.cpp's parser (src/llama-grammar.cpp) recurses once per nested group (parse_sequence ->
parse_alternates), so about 15,000 nested parentheses overflow an 8 MiB thread stack and kill
the process (SIGSEGV; llama-server dies the same way). Sampling costs grow with the
alternatives open at one position (every one is a grammar stack each candidate token is checked
against: 20,000 of them took over a minute for two tokens), and `x{m,n}` copies its item up to
max(m, n) times. So a grammar is measured by a lexical scan (string literals, character classes
and comments skipped; no parse) and refused (400 naming the limit) past any of these:
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ApiError, bad_request

GRAMMAR_MAX_BYTES = 1 << 20          # the JSON Schema converter's own output bound (1 MiB)
GRAMMAR_MAX_DEPTH = 200              # nested groups; llama.cpp's parser overflows at ~15,000
GRAMMAR_MAX_RULES = 20_000           # rules, the parser's synthesized ones (groups, */+/?) included
GRAMMAR_MAX_ALTERNATIVES = 1_024     # alternatives of one rule or group
GRAMMAR_MAX_TOTAL_ALTERNATIVES = 16_384  # `|` in the whole grammar
GRAMMAR_MAX_EXPANSION = 1 << 20      # elements that `{m,n}` repetitions write out

# The tokens that matter, in one pass of the regex engine; everything else is skipped.
# A string literal or a character class that never closes is matched to the end (the parser
# will refuse it; it must not make us miscount).
_TOKENS = re.compile(r'''
    "(?:[^"\\]|\\.)*"?          # string literal
  | \[(?:[^\]\\]|\\.)*\]?       # character class
  | \#[^\r\n]*                  # comment
  | ::=                         # a rule definition
  | \{\s*(\d*)\s*(,?)\s*(\d*)\s*\}   # repetition {m}, {m,}, {m,n}
  | [()|*+?]
  | [A-Za-z0-9-]+               # a rule name (the item a repetition may copy)
''', re.VERBOSE | re.DOTALL)


@dataclass
class GrammarSize:
    """What the scan measured."""

    n_bytes: int = 0
    depth: int = 0              # deepest group nesting
    rules: int = 0              # rule definitions plus the rules the parser synthesizes
    alternatives: int = 0       # most alternatives of one rule or group
    total_alternatives: int = 0
    expansion: int = 0          # elements written out by {m,n} repetitions


def _item_size(token: str) -> int:
    """Elements a repetition copies of the item before it: a literal's characters, else one
    (a group or a rule name is a reference; a class is copied too, as few elements)."""
    return max(1, len(token) - 2) if token[:1] in ('"', "[") else 1


def measure(text: str) -> GrammarSize:
    """Size, depth, rules, alternatives and repetition expansion of GBNF `text`."""
    size = GrammarSize(n_bytes=len(text.encode("utf-8", "surrogatepass")))
    alts = [1]          # alternatives of the open rule, then of each open group
    prev = ""           # the last item (literal, class, name, ")") a repetition applies to
    for m in _TOKENS.finditer(text):
        tok = m.group(0)
        c = tok[0]
        if c == "#":
            continue
        if tok == "::=":
            size.rules += 1
            size.alternatives = max(size.alternatives, *alts)
            alts, prev = [1], ""
        elif c == "(":
            size.rules += 1
            alts.append(1)
            size.depth = max(size.depth, len(alts) - 1)
            prev = ""
        elif c == ")":
            if len(alts) > 1:
                size.alternatives = max(size.alternatives, alts.pop())
            prev = ")"
        elif c == "|":
            alts[-1] += 1
            size.total_alternatives += 1
        elif c in "*+?":
            size.rules += 1
        elif c == "{":
            lo, comma, hi = m.group(1), m.group(2), m.group(3)
            n = max(int(lo or 0), int(hi or 0)) if (hi or not comma) else int(lo or 0) + 1
            size.rules += max(1, n - int(lo or 0))
            size.expansion += (_item_size(prev) + 2) * max(1, n)
        else:
            prev = tok
    size.alternatives = max(size.alternatives, *alts)
    return size


def check_grammar(text: str | None, field: str) -> None:
    """Refuse (400) a grammar past any bound, naming the field, the bound and its value."""
    if not text:
        return
    if len(text) > GRAMMAR_MAX_BYTES:  # before the scan: characters are at most bytes
        raise _refuse(field, f"is larger than {GRAMMAR_MAX_BYTES} bytes")
    s = measure(text)
    for got, limit, what in (
        (s.n_bytes, GRAMMAR_MAX_BYTES, "bytes"),
        (s.depth, GRAMMAR_MAX_DEPTH, "levels of nested groups"),
        (s.rules, GRAMMAR_MAX_RULES, "rules (groups and repetitions included)"),
        (s.alternatives, GRAMMAR_MAX_ALTERNATIVES, "alternatives in one rule or group"),
        (s.total_alternatives, GRAMMAR_MAX_TOTAL_ALTERNATIVES, "alternatives in all"),
        (s.expansion, GRAMMAR_MAX_EXPANSION, "elements written out by {m,n} repetitions"),
    ):
        if got > limit:
            raise _refuse(field, f"has {got} {what}; the limit is {limit}")


def _refuse(field: str, what: str) -> ApiError:
    return bad_request(f"'{field}': the grammar {what}")
