"""JSON Schema -> GBNF: the grammar text llama_sampler_init_grammar takes (start symbol "root").

Written for llama-server's `json_schema` / `response_format` fields. This module walks the
schema and names the rules; the grammar-text pieces (literals, integer ranges, regex patterns)
come from gbnf.py. The output accepts exactly the JSON texts (with a little whitespace between
tokens) that the schema allows, for the supported keywords:

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
  annotations and ignored), pattern (a regex subset, see gbnf.regex_to_gbnf; a search, as
  JSON Schema says, unless anchored with ^ and $)
- integer: minimum / maximum / exclusiveMinimum / exclusiveMaximum

A keyword that would restrict values and that we cannot express (not, if/then/else,
uniqueItems, multipleOf, number bounds, ...) raises ValueError naming it: a grammar that let
invalid values through would be worse than a clear refusal. Annotations (title, description,
default, examples, $schema, ...) are ignored.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from .gbnf import gbnf_literal
from .json_schema_types import TypeRules, _json_text

__all__ = ["schema_to_grammar", "schemas_to_grammar", "ANY_JSON_GRAMMAR"]

# Keywords that restrict values and have no grammar here.
_UNSUPPORTED = (
    "not", "if", "then", "else", "patternProperties", "propertyNames", "dependentRequired",
    "dependentSchemas", "dependencies", "uniqueItems", "contains", "minContains", "maxContains",
    "multipleOf", "minProperties", "maxProperties", "unevaluatedProperties", "unevaluatedItems",
    "$dynamicRef", "$recursiveRef", "additionalItems",
)
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")

# Bounds on the work one schema may cause (a request's schema is untrusted input): how deeply
# schemas nest, how many subschemas are converted in all (a $ref is converted once, but allOf
# merges and type lists copy their parts), and the size of the grammar text.
MAX_DEPTH = 100
MAX_STEPS = 50_000
MAX_GRAMMAR_CHARS = 1 << 20

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


# -- the converter ----------------------------------------------------------------------------

class _Converter(TypeRules):
    def __init__(self, root: Any):
        self.root = root
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}
        self.refs: dict[str, str] = {}
        self.unguarded: set = set()  # refs (and allOf ids) being converted, nothing matched since
        self.all_of_rules: dict[int, list] = {}  # id of an allOf being converted -> [name, used]
        self.merging: set[int] = set()  # ids of the allOf schemas being merged
        self.merged: dict[int, tuple[Any, dict]] = {}  # id -> (schema, its allOf merged)
        self.depth = self.steps = self.size = 0

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
        self.grow(len(body))
        name = self.fresh(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def grammar(self, root: str) -> str:
        """The GBNF text: "root ::= root", then every rule made, in order."""
        return "".join(f"{name} ::= {body}\n" for name, body in {"root": root, **self.rules}.items())

    def grow(self, n: int) -> None:
        self.check(n)
        self.size += n

    def check(self, n: int) -> None:
        """Refuses to go on if n more characters of grammar would be too many."""
        if self.size + n > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the schema makes a grammar of more than {MAX_GRAMMAR_CHARS} characters")

    def enter(self, hint: str) -> None:
        """One more subschema on the way down (leave() undoes it); refuses runaway schemas."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ValueError(f"the schema is too complex (more than {MAX_STEPS} subschemas to convert)")
        if self.depth >= MAX_DEPTH:
            raise ValueError(f"the schema is nested too deeply (more than {MAX_DEPTH} levels, at {hint[:200]})")
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1

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
        self.enter(hint)
        try:
            return self._visit(schema, hint)
        finally:
            self.leave()

    def _visit(self, schema: Any, hint: str) -> str:
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
            parts = schema["allOf"]
            if isinstance(parts, list) and len(parts) == 1 and len(schema) == 1:
                return self.visit(parts[0], hint)  # a $ref in it is a rule, so it may recurse
            return self.all_of_rule(schema, hint)
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
        # objects and arrays open with a bracket and strings with a quote: a $ref below is
        # reached only after a character, so recursing to one being converted is no left recursion
        saved, self.unguarded = self.unguarded, set()
        try:
            return getattr(self, "t_" + t)(schema, hint)
        finally:
            self.unguarded = saved

    def ref(self, ref: Any) -> str:
        """A rule for the schema `ref` points to, made once (a recursive reference finds it)."""
        target = self.lookup(ref)
        if ref in self.refs:
            if ref in self.unguarded:
                raise ValueError(f"'$ref' {ref!r} refers to itself before matching anything (left recursion)")
            return self.refs[ref]
        name = self.fresh("ref-" + ref.rsplit("/", 1)[-1])
        self.refs[ref] = name
        self.rules[name] = ""  # reserved: a recursive reference finds the name
        self.unguarded.add(ref)
        try:
            self.rules[name] = self.visit(target, name + "-def")
        finally:
            self.unguarded.discard(ref)
        return name

    def lookup(self, ref: Any) -> Any:
        """The part of the document that a "#/..." JSON pointer names."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"'$ref' {ref!r}: only references into the same document (#/...) are supported")
        target: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise ValueError(f"'$ref' {ref!r} cannot be resolved")
        return target

    def resolve(self, schema: Any) -> Any:
        """`schema` with its $ref followed (through chains of them) to a schema without one."""
        seen = set()
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            target = self.lookup(ref)
            if ref in seen:
                raise ValueError(f"'$ref' {ref!r} refers to itself")
            seen.add(ref)
            schema = target
        return schema

    def all_of_rule(self, schema: dict, hint: str) -> str:
        """The merged allOf, converted. Merging inlines the parts, so a part that leads back to
        this schema (a $ref to an ancestor) gets a rule, made only then, that it refers to."""
        key = id(schema)
        if key in self.all_of_rules:
            if key in self.unguarded:
                raise ValueError(f"'allOf' refers to itself before matching anything (left recursion, at {hint})")
            self.all_of_rules[key][1] = True
            return self.all_of_rules[key][0]
        merged = self.all_of(schema, hint)
        name = self.fresh(hint + "-all-of")
        self.rules[name] = ""  # reserved, dropped if unused
        self.all_of_rules[key] = entry = [name, False]
        self.unguarded.add(key)
        try:
            body = self.visit(merged, hint)
        finally:
            self.unguarded.discard(key)
            del self.all_of_rules[key]
        if not entry[1]:
            del self.rules[name]
            return body
        self.rules[name] = body
        return name

    def all_of(self, schema: dict, hint: str) -> dict:
        """allOf of object schemas (and the parent's own keywords) merged into one."""
        if id(schema) in self.merged:
            return self.merged[id(schema)][1]
        if id(schema) in self.merging:
            raise ValueError(f"'allOf' includes itself (through '$ref'), it cannot be merged (at {hint})")
        self.merging.add(id(schema))
        self.enter(hint)
        try:
            out = self._all_of(schema, hint)
        finally:
            self.leave()
            self.merging.discard(id(schema))
        self.merged[id(schema)] = (schema, out)  # the schema is kept: its id stays its own
        return out

    def _all_of(self, schema: dict, hint: str) -> dict:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise ValueError(f"'allOf' must be a non-empty array of schemas (at {hint})")
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        subs = [self.resolve(p) for p in parts]
        if len(subs) == 1 and not rest:
            one = subs[0]  # merged too if it is an allOf itself (a part left as is lost its allOf)
            if not isinstance(one, (dict, bool)):
                raise ValueError(f"'allOf' entries must be schemas (at {hint})")
            return self.all_of(one, hint) if isinstance(one, dict) and "allOf" in one else one
        out: dict = {"type": "object", "properties": {}, "required": []}
        for s in [rest] + subs:
            if not isinstance(s, dict):
                raise ValueError(f"'allOf' entries must be schemas (at {hint})")
            if "allOf" in s:
                s = self.all_of(s, hint)
                if not isinstance(s, dict):
                    raise ValueError(f"'allOf' is supported only for object schemas (at {hint})")
            if s.get("type", "object") != "object" or any(k in s for k in ("anyOf", "oneOf", "enum", "const")):
                raise ValueError(f"'allOf' is supported only for object schemas (at {hint})")
            if not isinstance(s.get("properties", {}), dict):
                raise ValueError(f"'properties' must be an object (at {hint})")
            if not isinstance(s.get("required", []), list):
                raise ValueError(f"'required' must be an array of strings (at {hint})")
            out["properties"].update(s.get("properties", {}))
            out["required"] += [r for r in s.get("required", []) if r not in out["required"]]
            if "additionalProperties" in s:
                out["additionalProperties"] = s["additionalProperties"]
        return out


def schema_to_grammar(schema: Any) -> str:
    """GBNF text (root rule "root") for a JSON Schema given as parsed JSON.

    An empty schema ({}) is any JSON object, as llama-server has it. Raises ValueError for an
    invalid schema or an unsupported keyword (the message names it)."""
    return schemas_to_grammar([schema], lambda names: names[0])


def schemas_to_grammar(schemas: Sequence[Any], root: Callable[[list[str]], str]) -> str:
    """One GBNF text holding a rule for each schema (each its own document for "$ref"), whose
    root rule is `root(rule names)`: a GBNF body that may also use the primitives "space"
    (optional whitespace) and "string" (any JSON string). How a tool call's arguments sit
    inside a format's markers. Raises ValueError as schema_to_grammar (for schema i: the
    message starts "schema i:" when there are several)."""
    conv = _Converter(None)
    conv.primitive("space")
    names = []
    for i, schema in enumerate(schemas):
        if isinstance(schema, dict) and not schema:
            schema = {"type": "object"}
        try:
            if not isinstance(schema, dict):
                raise ValueError("the schema must be an object")
            conv.root, conv.refs = schema, {}
            names.append(conv.visit(schema, "root-value" if len(schemas) == 1 else f"s{i}"))
        except ValueError as e:
            raise ValueError(f"schema {i}: {e}" if len(schemas) > 1 else str(e)) from None
    body = root(names)
    if re.search(r"(?<![\w-])string(?![\w-])", re.sub(r'"(?:\\.|[^"\\])*"', "", body)):
        conv.primitive("string")
    return conv.grammar(body)


def _any_json() -> str:
    conv = _Converter({})
    return conv.grammar(conv.primitive("value"))


# Any JSON value (llama.cpp's grammars/json.gbnf in spirit), for callers that want one.
ANY_JSON_GRAMMAR = _any_json()
