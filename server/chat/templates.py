"""Chat templates: where a server's template comes from, and how it renders messages.

Three kinds, one interface (`render(messages, add_generation_prompt, tools, kwargs) -> str`):

- `JinjaTemplate`: a Hugging Face chat template run by jinja2 in an immutable sandbox, with the
  conventions those templates are written for (transformers' `apply_chat_template`):
  `trim_blocks`/`lstrip_blocks`, the loop-controls extension, `raise_exception`, `strftime_now`,
  a `tojson` filter that keeps non-ASCII text, `bos_token`/`eos_token`, `messages`, `tools`,
  `add_generation_prompt`, and a request's `chat_template_kwargs` as further variables.
  As llama-server does, the model's BOS text at the start of the output is dropped when the
  tokenizer adds BOS itself, and `enable_thinking` defaults to true.
- `BuiltinTemplate`: llama.cpp's `llama_chat_apply_template` (a built-in name, or a template text
  it recognises): `--no-jinja`.
- `TranscriptTemplate`: the plain "User: ... / Assistant:" transcript for a model without any.

Where the text comes from, as llama-server: `--chat-template-file`, `--chat-template` (a built-in
name or a template text), else the GGUF's `tokenizer.chat_template` (and its `tool_use` variant
for requests with tools), else the transcript (see docs/server.md for why not chatml).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any, Sequence

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_lib import apply_chat_template, builtin_chat_templates

from ..errors import ApiError, bad_request

log = logging.getLogger("server")

TRANSCRIPT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# The transcript's stops: the earliest match wins, so "\nUser:" cuts the newline before the turn.
TRANSCRIPT_STOPS = ["\nUser:", "User:"]


class TemplateError(ValueError):
    """A template that cannot be compiled (a CLI error at start)."""


class TranscriptTemplate:
    """For models without a chat template (the default Gemma 3 270M base model): a plain
    transcript in llama.cpp's parallel-example style, ending with "Assistant:"."""

    kind = "transcript"
    name = "transcript"
    text = "transcript"
    stops = TRANSCRIPT_STOPS
    prefill_separator = " "  # "Assistant: <prefill>", as every turn is written

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               tools: list | None = None, kwargs: dict | None = None) -> str:
        lines = [f"{TRANSCRIPT_ROLES.get(m['role'], str(m['role']).capitalize())}: {m.get('content') or ''}"
                 for m in messages]
        if add_generation_prompt:
            lines.append("Assistant:")
        return "\n".join(lines)


class BuiltinTemplate:
    """llama.cpp's own template guesser (no Jinja): a built-in name or a text it recognises."""

    kind = "builtin"
    stops: list[str] = []
    prefill_separator = ""

    def __init__(self, text: str, name: str = "builtin"):
        self.text, self.name = text, name
        try:
            apply_chat_template(text, [{"role": "user", "content": "hi"}])
        except ValueError:
            raise TemplateError(
                "not a chat template llama.cpp recognises without Jinja; give a template text "
                f"llama.cpp detects or one of the built-in names: {', '.join(builtin_chat_templates())}"
            ) from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               tools: list | None = None, kwargs: dict | None = None) -> str:
        plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        try:
            return apply_chat_template(self.text, plain, add_assistant=add_generation_prompt)
        except ValueError as e:
            raise ApiError(500, "server_error", str(e)) from None


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it for
    training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple | None = None, sort_keys: bool = False) -> str:
    # transformers' filter: unlike jinja2's own it neither escapes HTML nor sorts keys
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _EmptyUndefined(jinja2.Undefined):
    """An undefined variable, as llama.cpp's Jinja engine treats it: empty text also when
    added to a string (firefunction-v2 writes `suffix + "\n" + functions` with no `functions`
    passed). Printing, iterating and testing it already behave so in jinja2's default."""

    def __add__(self, other: Any) -> Any:
        return other

    def __radd__(self, other: Any) -> Any:
        return other


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=_EmptyUndefined,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


class JinjaTemplate:
    """A Hugging Face chat template, rendered by jinja2 in a sandbox (see the module docstring)."""

    kind = "jinja"
    stops: list[str] = []
    prefill_separator = ""

    def __init__(self, text: str, name: str = "jinja", *, bos_token: str = "", eos_token: str = "",
                 add_bos: bool = False, tool_use_text: str | None = None):
        self.text, self.name = text, name
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        try:
            self._tmpl = _ENV.from_string(text)
            self._tool_use = _ENV.from_string(tool_use_text) if tool_use_text else None
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None

        self._caps: dict[str, bool] | None = None

    @property
    def caps(self) -> dict[str, bool]:
        if self._caps is None:
            self._caps = template_caps(self)
        return self._caps

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               tools: list | None = None, kwargs: dict | None = None) -> str:
        """Render, with llama-server's two adjustments to what a template cannot take: a system
        message goes in front of the next message when the template has no system role (Gemma 2
        refuses one), and tool-call arguments sent as a JSON string are given as the object
        when the template renders objects (most templates `tojson` them)."""
        msgs = list(messages)
        caps = self.caps
        if msgs and msgs[0]["role"] == "system" and not caps["supports_system_role"]:
            first, msgs = msgs[0], msgs[1:]
            if msgs:
                msgs[0] = {**msgs[0], "content": f"{first.get('content') or ''}\n{msgs[0].get('content') or ''}"}
        if caps["supports_object_arguments"]:
            msgs = [_object_arguments(m) if m.get("tool_calls") else m for m in msgs]
        return self._render(msgs, add_generation_prompt, tools, kwargs)

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool, tools: list | None,
                kwargs: dict | None) -> str:
        tmpl = self._tool_use if (tools and self._tool_use is not None) else self._tmpl
        now = datetime.now()
        # llama-server's extra variables (Llama 3.x prints date_string as "Today Date")
        ctx: dict[str, Any] = {"enable_thinking": True, "date_string": now.strftime("%d %b %Y"),
                               "datetime": now.strftime("%b %d %Y"), **(kwargs or {})}
        _alias_reasoning_vars(ctx)
        ctx.update(messages=list(messages), add_generation_prompt=add_generation_prompt,
                   bos_token=self.bos_token, eos_token=self.eos_token)
        if tools:
            ctx["tools"] = tools
        try:
            out = tmpl.render(**ctx)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(), or a template bug
            raise bad_request(f"chat template: {e.message or type(e).__name__}") from None
        except Exception as e:  # a template that fails on these messages (e.g. a type error)
            raise bad_request(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
        if self.add_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token):]  # the tokenizer adds it
        return out


def _alias_reasoning_vars(ctx: dict[str, Any]) -> None:
    """llama.cpp's other names for two settings (jinja/caps.cpp): a reasoning effort is also
    `reasoning_strength`; `preserve_reasoning` also sets `preserve_thinking` and its opposites
    `clear_thinking`, `truncate_history_thinking`, `drop_thinking`."""
    effort = ctx.get("reasoning_effort")
    if isinstance(effort, str) and effort:
        ctx["reasoning_strength"] = effort
    keep = ctx.get("preserve_reasoning")
    if isinstance(keep, bool):
        ctx.update(preserve_thinking=keep, clear_thinking=not keep, truncate_history_thinking=not keep,
                   drop_thinking=not keep)


def _object_arguments(m: dict) -> dict:
    """A message whose tool calls' `arguments` JSON strings are decoded (left alone if not JSON)."""
    calls = []
    for c in m["tool_calls"]:
        fn = c.get("function") if isinstance(c, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                c = {**c, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
            except ValueError:
                pass
        calls.append(c)
    return {**m, "tool_calls": calls}


def template_caps(template) -> dict[str, bool]:
    """What a template can render, by probing it (llama-server's `chat_template_caps`): each
    capability is a rendering with a marker that must come out in the prompt."""
    if not isinstance(template, JinjaTemplate):
        return {}

    def shows(marker: str, messages: list, tools: list | None = None) -> bool:
        try:
            return marker in template._render(messages, True, tools, None)
        except Exception:  # ApiError from raise_exception(), or a template bug
            return False

    def call(name: str, args: Any) -> dict:
        return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": args}}

    user = {"role": "user", "content": "hi"}
    tool = {"type": "function", "function": {"name": "probe_tool_fn", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    calls = {"role": "assistant", "content": "", "tool_calls": [call("probe_call_a", '{"x": 1}'),
                                                                 call("probe_call_b", '{"x": 2}')]}
    answer = {"role": "tool", "tool_call_id": "call_probe_call_a", "content": "probe_result"}
    return {
        "supports_string_content": True,
        "supports_typed_content": False,  # text parts are joined into one string before rendering
        "supports_tools": shows("probe_tool_fn", [user], [tool]),
        "supports_tool_calls": shows("probe_call_a", [user, calls, answer], [tool]),
        "supports_parallel_tool_calls": shows("probe_call_b", [user, calls, answer], [tool]),
        "supports_system_role": shows("probe_system_text", [{"role": "system", "content": "probe_system_text"}, user]),
        "supports_preserve_reasoning": False,
        "supports_reasoning_effort": False,
        "supports_object_arguments": _renders_objects(template, [user, {**calls, "tool_calls": [
            call("probe_call_a", {"probe_arg_key": "probe_arg_value"})]}, answer], [tool]),
    }


def _renders_objects(template: "JinjaTemplate", messages: list, tools: list) -> bool:
    """Does the template write a call's `arguments` given as an object itself (`tojson`, or
    its own format: Gemma 4's `{key:<|"|>value<|"|>}`), rather than print it as text (which
    would show Python's repr)? llama.cpp asks whether the template reads a key of it."""
    try:
        out = template._render(messages, True, tools, None)
    except Exception:
        return False
    return "probe_arg_value" in out and "'probe_arg_key'" not in out


def pick_template(text: str | None, source: str | None, model, jinja: bool):
    """The server's template: `text` from --chat-template(-file) (source: the flag that gave it),
    else the model's; Jinja unless --no-jinja (or a built-in name). Raises TemplateError."""
    vocab = model.vocab

    def jinja_of(t: str, name: str, tool_use: str | None = None) -> JinjaTemplate:
        return JinjaTemplate(t, name, bos_token=vocab.token_text(vocab.bos), eos_token=vocab.token_text(vocab.eos),
                             add_bos=vocab.add_bos, tool_use_text=tool_use)

    if text:
        if text in builtin_chat_templates():
            return BuiltinTemplate(text, text)
        return jinja_of(text, source or "--chat-template") if jinja else BuiltinTemplate(text, source or "--chat-template")
    own = model.chat_template()
    if own:
        try:
            if jinja:
                return jinja_of(own, "model", model.chat_template("tool_use"))
            return BuiltinTemplate(own, "model")
        except TemplateError as e:
            log.warning("the model's chat template is unusable (%s); chat uses the plain transcript", e)
    return TranscriptTemplate()
