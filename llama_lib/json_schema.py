"""JSON Schema -> GBNF: the grammar text llama_sampler_init_grammar takes (start symbol "root").

Written for llama-server's `json_schema` / `response_format` fields. The output accepts
exactly the JSON texts (with a little whitespace between tokens) that the schema allows, for
the supported keywords:

- type: string, number, integer, boolean, null, object, array, or a list of these
- enum, const (any JSON values)
- object: properties (kept in their order), required (the others may be left out),
  additionalProperties false / true / a schema. Without additionalProperties, an object with
  properties allows no other keys (as llama-server); `{"type": "object"}` alone is any object.
  Extra keys are any string (a listed name is not excluded).
- array: items (a schema; a list of schemas is a tuple, as prefixItems), prefixItems,
  minItems / maxItems
- anyOf / oneOf (oneOf is taken as anyOf), allOf (of object schemas, merged; a single entry)
- $ref to "#/..." in the same document (#/definitions/X, #/$defs/X), recursion allowed
- string: minLength / maxLength, format date / time / date-time / uuid (other formats are
  annotations and ignored), pattern (a regex subset: literals, ., classes, \\d \\w \\s,
  groups, |, * + ? {n,m}; a search, as JSON Schema says, unless anchored with ^ and $)
- integer: minimum / maximum / exclusiveMinimum / exclusiveMaximum

A keyword that would restrict values and that we cannot express (not, if/then/else,
uniqueItems, multipleOf, number bounds, ...) raises ValueError naming it: a grammar that let
invalid values through would be worse than a clear refusal. Annotations (title, description,
default, examples, $schema, ...) are ignored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["schema_to_grammar", "ANY_JSON_GRAMMAR"]

# Keywords that restrict values and have no grammar here.
_UNSUPPORTED = (
    "not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "dependencies", "uniqueItems", "contains", "minContains", "maxContains",
    "multipleOf", "minProperties", "maxProperties", "unevaluatedProperties", "unevaluatedItems",
    "$dynamicRef", "$recursiveRef", "additionalItems",
)
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")

# Shared rules. Whitespace between tokens is bounded so that a model cannot run on forever.
_PRIMITIVES: dict[str, str] = {
    "space": '" "? | "\\n" [ \\t]{0,20}',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "int-part": '"0" | [1-9] [0-9]{0,15}',
    "integer": '"-"? int-part space',
    "number": '"-"? int-part ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? space',
    "char": '[^"\\\\\\x00-\\x1F\\x7F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\"" space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
    "array": '"[" space (value ("," space value)*)? "]" space',
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
            '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "date-time": 'date "T" time',
    "hex4": "[0-9a-fA-F]{4}",
    "uuid": 'hex4 hex4 "-" hex4 "-" hex4 "-" hex4 "-" hex4 hex4 hex4',
}
_DEPENDS = {
    "boolean": ["space"], "null": ["space"], "integer": ["int-part", "space"],
    "number": ["int-part", "space"], "string": ["char", "space"],
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["string", "value", "space"], "array": ["value", "space"],
    "date-time": ["date", "time"], "uuid": ["hex4"],
}


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


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_string_of(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# -- integer ranges ---------------------------------------------------------------------------

def _digits_range(a: str, b: str) -> str:
    """GBNF for the digit strings of equal length between a and b (inclusive)."""
    if not a:
        return ""
    if len(a) == 1:
        return f"[{a}-{b}]" if a != b else f'"{a}"'
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


def _int_range(lo: int | None, hi: int | None) -> str:
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
    return gbnf_literal(_json_string_of(chr(o))[1:-1])


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


class _Regex:
    """A recursive-descent translation of a regex subset into GBNF over JSON string contents."""

    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"'pattern' {self.p!r}: {what} is not supported")

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
            inner = self.alternation()
            if self.peek() != ")":
                raise ValueError(f"'pattern' {self.p!r}: unbalanced parentheses")
            self.i += 1
            return f"({inner})"
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return "char"
        if c in "*+?{":
            raise ValueError(f"'pattern' {self.p!r}: nothing to repeat at position {self.i}")
        if c == "^":
            raise self.error("'^' inside the pattern")
        if c == "\\":
            ranges, negate = self.escape(in_class=False)
            if ranges is None:
                raise self.error(f"escape '\\{self.p[self.i - 1]}'")
            return _set_expr(ranges, negate)
        self.i += 1
        return _set_expr([(ord(c), ord(c))], False)

    def escape(self, in_class: bool) -> tuple[list[tuple[int, int]] | None, bool]:
        """After a backslash: (ranges, negated) or (None, _) for an unsupported escape."""
        self.i += 1
        c = self.peek()
        if not c:
            raise ValueError(f"'pattern' {self.p!r}: trailing backslash")
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
                raise ValueError(f"'pattern' {self.p!r}: unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                r, neg = self.escape(in_class=True)
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
                    r, neg = self.escape(in_class=True)
                    if r is None or neg or len(r) != 1 or r[0][0] != r[0][1]:
                        raise self.error("this range end inside a class")
                    hi = r[0][0]
                else:
                    hi = ord(self.peek())
                    self.i += 1
                if hi < lo:
                    raise ValueError(f"'pattern' {self.p!r}: bad range in a character class")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return _set_expr(ranges, negate)


# -- the converter ----------------------------------------------------------------------------

class _Converter:
    def __init__(self, root: Any):
        self.root = root
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    # rules

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _DEPENDS.get(name, ()):
                self.primitive(dep)
        return name

    def add(self, hint: str, body: str) -> str:
        """A rule with this body (reused if one exists), named after hint."""
        if body in self.by_body:
            return self.by_body[body]
        name = self.fresh(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def fresh(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "r"
        if base in _PRIMITIVES:
            base += "-"
        name, n = base, 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}{n}"
        return name

    # schemas

    def visit(self, schema: Any, hint: str) -> str:
        """A rule name (or expression) matching a JSON value valid for schema, then space."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if not isinstance(schema, dict):
            raise ValueError(f"{hint}: a schema must be an object")
        for k in _UNSUPPORTED:
            if k in schema:
                raise ValueError(f"'{k}' is not supported (at {hint})")
        if "$ref" in schema:
            return self.ref(schema["$ref"])
        for key in ("oneOf", "anyOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise ValueError(f"'{key}' must be a non-empty array of schemas (at {hint})")
                names = [self.visit(s, f"{hint}-{i}") for i, s in enumerate(alts)]
                return self.add(hint, " | ".join(names))
        t = schema.get("type")
        if isinstance(t, list):
            if not t:
                raise ValueError(f"'type' must not be empty (at {hint})")
            names = [self.visit({**schema, "type": x}, f"{hint}-{x}") for x in t]
            return self.add(hint, " | ".join(names))
        if "const" in schema:
            self.primitive("space")
            return self.add(hint, gbnf_literal(_json_text(schema["const"])) + " space")
        if "enum" in schema:
            vals = schema["enum"]
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"'enum' must be a non-empty array (at {hint})")
            self.primitive("space")
            return self.add(hint, "(" + " | ".join(gbnf_literal(_json_text(v)) for v in vals) + ") space")
        if t is not None and not isinstance(t, str):
            raise ValueError(f"'type' must be a string or an array of strings (at {hint})")
        if t is not None and t not in _TYPES:
            raise ValueError(f"'type' {t!r} is not a JSON Schema type (at {hint})")
        if "allOf" in schema:
            return self.visit(self.all_of(schema, hint), hint)
        if t is None:
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                t = "object"
            elif "items" in schema or "prefixItems" in schema or "minItems" in schema or "maxItems" in schema:
                t = "array"
            elif any(k in schema for k in ("pattern", "minLength", "maxLength", "format")):
                t = "string"
            elif any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                t = "number"
            else:
                return self.primitive("value")
        return getattr(self, "t_" + t)(schema, hint)

    def ref(self, ref: Any) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"'$ref' {ref!r}: only references into the same document (#/...) are supported")
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise ValueError(f"'$ref' {ref!r} cannot be resolved")
        name = self.fresh("ref-" + ref.rsplit("/", 1)[-1])
        self.refs[ref] = name
        self.rules[name] = ""  # reserved: a recursive reference finds the name
        self.rules[name] = self.visit(target, name + "-def")
        return name

    def resolve(self, schema: Any) -> Any:
        seen = set()
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            if ref in seen:
                raise ValueError(f"'$ref' {ref!r} refers to itself")
            seen.add(ref)
            target = self.root
            for part in ref[1:].split("/")[1:]:
                try:
                    target = target[int(part)] if isinstance(target, list) else target[part]
                except (KeyError, IndexError, ValueError, TypeError):
                    raise ValueError(f"'$ref' {ref!r} cannot be resolved") from None
            schema = target
        return schema

    def all_of(self, schema: dict, hint: str) -> dict:
        """allOf of object schemas (and the parent's own keywords) merged into one."""
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise ValueError(f"'allOf' must be a non-empty array of schemas (at {hint})")
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        subs = [self.resolve(p) for p in parts]
        if len(subs) == 1 and not rest:
            return subs[0]
        out: dict = {"type": "object", "properties": {}, "required": []}
        for s in [rest] + subs:
            if not isinstance(s, dict):
                raise ValueError(f"'allOf' entries must be schemas (at {hint})")
            if "allOf" in s:
                s = self.all_of(s, hint)
            if s.get("type", "object") != "object" or any(k in s for k in ("anyOf", "oneOf", "enum", "const")):
                raise ValueError(f"'allOf' is supported only for object schemas (at {hint})")
            out["properties"].update(s.get("properties", {}))
            out["required"] += [r for r in s.get("required", []) if r not in out["required"]]
            if "additionalProperties" in s:
                out["additionalProperties"] = s["additionalProperties"]
        return out

    # types

    def t_null(self, schema: dict, hint: str) -> str:
        return self.primitive("null")

    def t_boolean(self, schema: dict, hint: str) -> str:
        return self.primitive("boolean")

    def t_number(self, schema: dict, hint: str) -> str:
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if k in schema:
                raise ValueError(f"'{k}' is supported only for type 'integer' (at {hint})")
        return self.primitive("number")

    def t_integer(self, schema: dict, hint: str) -> str:
        def bound(key: str) -> float | None:
            v = schema.get(key)
            if v is None or isinstance(v, bool):
                return None if v is None else _bad(key)
            if not isinstance(v, (int, float)):
                _bad(key)
            return v

        def _bad(key: str):
            raise ValueError(f"'{key}' must be a number (at {hint})")

        lo = hi = None
        if (v := bound("minimum")) is not None:
            lo = math.ceil(v)
        if (v := bound("exclusiveMinimum")) is not None:
            lo = max(lo if lo is not None else -math.inf, math.floor(v) + 1)
        if (v := bound("maximum")) is not None:
            hi = math.floor(v)
        if (v := bound("exclusiveMaximum")) is not None:
            hi = min(hi if hi is not None else math.inf, math.ceil(v) - 1)
        if lo is None and hi is None:
            return self.primitive("integer")
        self.primitive("space")
        return self.add(hint, _int_range(None if lo is None else int(lo), None if hi is None else int(hi)) + " space")

    def t_string(self, schema: dict, hint: str) -> str:
        self.primitive("space")
        pattern = schema.get("pattern")
        fmt = schema.get("format")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ValueError(f"'pattern' must be a string (at {hint})")
            if "minLength" in schema or "maxLength" in schema:
                raise ValueError(f"'pattern' together with 'minLength'/'maxLength' is not supported (at {hint})")
            self.primitive("char")
            return self.add(hint, '"\\"" (' + _Regex(pattern).parse() + ') "\\"" space')
        if isinstance(fmt, str) and (fmt in ("date", "time", "date-time", "uuid")
                                     or re.fullmatch(r"uuid[1-5]", fmt)):
            prim = self.primitive("uuid" if fmt.startswith("uuid") else fmt)
            return self.add(f"{fmt}-string", f'"\\"" {prim} "\\"" space')
        lo, hi = _count(schema, "minLength", 0, hint), _count(schema, "maxLength", None, hint)
        if lo == 0 and hi is None:
            return self.primitive("string")
        if hi is not None and hi < lo:
            raise ValueError(f"'maxLength' is below 'minLength' (at {hint})")
        self.primitive("char")
        rep = f"{{{lo},{'' if hi is None else hi}}}"
        return self.add(hint, f'"\\"" char{rep} "\\"" space')

    def t_array(self, schema: dict, hint: str) -> str:
        self.primitive("space")
        items, prefix = schema.get("items"), schema.get("prefixItems")
        if isinstance(items, list):
            prefix, items = items, None
        if prefix is not None:
            if not isinstance(prefix, list):
                raise ValueError(f"'prefixItems' must be an array of schemas (at {hint})")
            names = [self.visit(s, f"{hint}-{i}") for i, s in enumerate(prefix)]
            body = ' "," space '.join(names)
            if items not in (None, False):
                extra = self.visit(items, f"{hint}-item")
                body = f'{body} ("," space {extra})*' if names else f'({extra} ("," space {extra})*)?'
            return self.add(hint, f'"[" space {body} "]" space')
        item = self.primitive("value") if items is None or items is True else self.visit(items, f"{hint}-item")
        lo, hi = _count(schema, "minItems", 0, hint), _count(schema, "maxItems", None, hint)
        if hi is not None and hi < lo:
            raise ValueError(f"'maxItems' is below 'minItems' (at {hint})")
        if hi == 0:
            return self.add(hint, '"[" space "]" space')
        more = f"{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        if more == "{0,}":
            more = "*"
        seq = f'{item} ("," space {item}){more}'
        if lo == 0:
            seq = f"({seq})?"
        return self.add(hint, f'"[" space {seq} "]" space')

    def t_object(self, schema: dict, hint: str) -> str:
        self.primitive("space")
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"'properties' must be an object (at {hint})")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"'required' must be an array of strings (at {hint})")
        addl = schema.get("additionalProperties", None if props else True)
        # a required name without a schema in 'properties' may hold any value
        props = {**props, **{r: {} for r in required if r not in props}}
        if addl is not None and not isinstance(addl, (bool, dict)):
            raise ValueError(f"'additionalProperties' must be a boolean or a schema (at {hint})")
        if not props and (addl is True or addl == {}):
            return self.primitive("object")
        items = []
        for name, sub in props.items():
            value = self.visit(sub, f"{hint}-{name}")
            kv = self.add(f"{hint}-{name}-kv", f'{gbnf_literal(_json_string_of(name))} space ":" space {value}')
            items.append((kv, name in required))
        extra = None
        if addl not in (None, False):
            value = self.primitive("value") if addl is True else self.visit(addl, f"{hint}-additional")
            extra = self.add(f"{hint}-additional-kv", f'{self.primitive("string")} ":" space {value}')
        n = len(items)
        # after[i]: items i.. when something was written already (each needs a comma first)
        after = [""] * (n + 1)
        after[n] = f'("," space {extra})*' if extra else ""
        for i in range(n - 1, -1, -1):
            kv, req = items[i]
            one = f'"," space {kv}'
            after[i] = " ".join(x for x in ((one if req else f"({one})?"), after[i + 1]) if x)
        # start(i): items i.. when nothing was written yet
        tail = f"({extra} (\",\" space {extra})*)?" if extra else ""

        def start(i: int) -> str:
            if i == n:
                return tail or '""'
            kv, req = items[i]
            with_it = " ".join(x for x in (kv, after[i + 1]) if x)
            if req:
                return with_it
            return f"{with_it} | {self.add(f'{hint}-from-{i + 1}', start(i + 1))}" if i + 1 <= n else with_it

        body = start(0)
        return self.add(hint, f'"{{" space ({body}) "}}" space')


def _count(schema: dict, key: str, default: int | None, hint: str) -> int | None:
    v = schema.get(key, default)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"'{key}' must be a non-negative integer (at {hint})")
    return v


def schema_to_grammar(schema: Any) -> str:
    """GBNF text (root rule "root") for a JSON Schema given as parsed JSON.

    An empty schema ({}) is any JSON object, as llama-server has it. Raises ValueError for an
    invalid schema or an unsupported keyword (the message names it)."""
    if isinstance(schema, dict) and not schema:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError("the schema must be an object")
    conv = _Converter(schema)
    root = conv.visit(schema, "root-value")
    rules = {"root": root, **conv.rules}
    return "".join(f"{name} ::= {body}\n" for name, body in rules.items())


def _any_json() -> str:
    conv = _Converter({})
    root = conv.primitive("value")
    return "".join(f"{n} ::= {b}\n" for n, b in {"root": root, **conv.rules}.items())


# Any JSON value (llama.cpp's grammars/json.gbnf in spirit), for callers that want one.
ANY_JSON_GRAMMAR = _any_json()
