"""Structured output: a request's `grammar`, `json_schema` and `response_format` as one GBNF text.

llama-server's fields (tools/server/server-schema.cpp, server-common.cpp):

- `grammar`: GBNF text, start symbol "root" ("" = none).
- `json_schema`: a JSON Schema, converted by llama_lib.json_schema; {} means any JSON object.
- `response_format`: {"type": "text"} (nothing), {"type": "json_object"} (any JSON object),
  {"type": "json_object", "schema": S} or {"type": "json_schema", "json_schema": {"schema": S}}
  (S). It overrides `json_schema`.

`grammar` together with a schema is refused (400 "Cannot use both json_schema and grammar"), as
llama-server does for chat. llama-server reads `response_format` only in chat requests and, on
/completion, lets `grammar` win over `json_schema`; here every generation endpoint reads the three
fields the same way. A grammar that does not parse is refused when the request is submitted (the
engine parses it against the model's vocabulary, llama_lib.sampler.SamplingParams.validate);
before that, every grammar, written or converted, is measured against grammar_limits' bounds.
"""

from __future__ import annotations

from typing import Any

from llama_lib.json_schema import schema_to_grammar

from ..errors import bad_request
from ..fields import _MISSING
from ..limits import check_schema
from .grammar_limits import check_grammar


def _schema_grammar(schema: Any, field: str) -> str:
    check_schema(schema, field)
    try:
        return schema_to_grammar(schema)
    except ValueError as e:
        raise bad_request(f'"{field}": JSON schema conversion failed: {e}') from None
    except RecursionError:
        raise bad_request(f'"{field}": JSON schema conversion failed: the schema is nested too deeply') from None


def get_grammar(body: dict) -> str | None:
    """The GBNF text the request asks for, or None. Raises ApiError (400) on invalid input."""
    grammar = body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise bad_request("'grammar' must be a string (GBNF)")
    schema: Any = body.get("json_schema", _MISSING)
    field = "json_schema"
    if schema is None:
        schema = _MISSING
    if schema is not _MISSING and grammar:
        raise bad_request("Cannot use both json_schema and grammar")

    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict):
            raise bad_request("'response_format' must be an object")
        kind = rf.get("type")
        if kind is not None and not isinstance(kind, str):
            raise bad_request("'response_format.type' must be a string")
        if kind == "json_object":
            if "schema" in rf or schema is _MISSING:
                schema, field = rf.get("schema", {}), "response_format.schema"
        elif kind == "json_schema":
            wrapper = rf.get("json_schema", {})
            if not isinstance(wrapper, dict):
                raise bad_request("'response_format.json_schema' must be an object")
            schema, field = wrapper.get("schema", {}), "response_format.json_schema.schema"
        elif kind not in (None, "", "text"):
            raise bad_request('response_format type must be one of "text" or "json_object", '
                              f"but got: {kind}")
        if schema is not _MISSING and grammar:
            raise bad_request("Cannot use both json_schema and grammar")

    if schema is not _MISSING:
        grammar = _schema_grammar(schema, field)
    else:
        field = "grammar"
    check_grammar(grammar, field)
    return grammar or None
