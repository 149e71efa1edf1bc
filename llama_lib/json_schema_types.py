"""The rule of each JSON Schema type (string, number, integer, boolean, null, array, object),
for json_schema.py's converter: a mixin, so that the converter's walk (refs, anyOf, allOf,
limits) and the shape of each type's JSON text are read apart."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .gbnf import gbnf_literal, int_range, regex_to_gbnf


def _json_text(value: Any) -> str:
    """Compact JSON, non-ASCII kept: the text a value is written as (a name, a const, an enum)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class TypeRules:
    """`t_<type>(schema, hint)`: a rule for a value of that type. Needs the converter's
    `add`, `visit`, `primitive` and `resolve`."""

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
            if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
                _bad(key)
            return v

        def _bad(key: str):
            raise ValueError(f"'{key}' must be a finite number (at {hint})")

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
        return self.add(hint, int_range(None if lo is None else int(lo), None if hi is None else int(hi)) + " space")

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
            return self.add(hint, _quoted(f"({regex_to_gbnf(pattern)})"))
        if isinstance(fmt, str) and (fmt in ("date", "time", "date-time", "uuid")
                                     or re.fullmatch(r"uuid[1-5]", fmt)):
            prim = self.primitive("uuid" if fmt.startswith("uuid") else fmt)
            return self.add(f"{fmt}-string", _quoted(prim))
        lo, hi = _count(schema, "minLength", 0, hint), _count(schema, "maxLength", None, hint)
        if lo == 0 and hi is None:
            return self.primitive("string")
        if hi is not None and hi < lo:
            raise ValueError(f"'maxLength' is below 'minLength' (at {hint})")
        self.primitive("char")
        rep = f"{{{lo},{'' if hi is None else hi}}}"
        return self.add(hint, _quoted(f"char{rep}"))

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
            kv = self.add(f"{hint}-{name}-kv", f'{gbnf_literal(_json_text(name))} space ":" space {value}')
            items.append((kv, name in required))
        extra = None
        if addl not in (None, False):
            value = self.primitive("value") if addl is True else self.visit(addl, f"{hint}-additional")
            extra = self.add(f"{hint}-additional-kv", f'{self.primitive("string")} ":" space {value}')
        n = len(items)
        # after(i): items i.. when something was written already (each needs a comma first)
        pieces = [f'"," space {kv}' if req else f'("," space {kv})?' for kv, req in items]
        if extra:
            pieces.append(f'("," space {extra})*')
        # start(i): items i.. when nothing was written yet: item i and what follows it, or (item
        # i optional) start(i + 1), a rule. Built from the first required item k back to 0; each
        # of these holds after(i + 1), so the object costs about k * n (checked before it is built).
        k = next((i for i, (_, req) in enumerate(items) if req), n)
        suffix = [0] * (len(pieces) + 1)
        for i in range(len(pieces) - 1, -1, -1):
            suffix[i] = suffix[i + 1] + len(pieces[i]) + 1
        self.check(sum(suffix[i + 1] for i in range(min(k + 1, n))))

        def with_it(i: int) -> str:
            return " ".join([items[i][0], *pieces[i + 1:]])

        tail = f"({extra} (\",\" space {extra})*)?" if extra else ""
        body = (tail or '""') if k == n else with_it(k)
        for i in range(k - 1, -1, -1):
            body = f"{with_it(i)} | {self.add(f'{hint}-from-{i + 1}', body)}"
        return self.add(hint, f'"{{" space ({body}) "}}" space')

def _quoted(contents: str) -> str:
    """A rule body for a JSON string whose contents (between the quotes) match `contents`."""
    return f'"\\"" {contents} "\\"" space'


def _count(schema: dict, key: str, default: int | None, hint: str) -> int | None:
    v = schema.get(key)
    if v is None:  # absent or null (as a null bound of an integer): the default
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"'{key}' must be a non-negative integer (at {hint})")
    return v
