"""Chat flags, as llama-server names them: where the chat template comes from, whether Jinja
renders it, where a chat's thinking goes, the reasoning controls (`--reasoning`, its effort,
budget and message), the template's extra variables, `--skip-chat-parsing`,
`--prefill-assistant` and `--responses-store`. `check_chat_template` makes a template that cannot even be compiled a
CLI error (exit 2) rather than a failure on the first request; `chat_options` gives the
`ChatOptions` every chat request reads."""

from __future__ import annotations

import argparse
import json
import logging

from ..api.response_store import DEFAULT_STORE_MIB
from ..chat.options import ChatOptions
from ..chat.reasoning import REASONING_FORMATS

log = logging.getLogger("server")

# common_arg_utils::is_truthy / is_falsey / is_autoy
_TRUTHY, _FALSEY, _AUTOY = ("on", "enabled", "true", "1"), ("off", "disabled", "false", "0"), ("auto", "-1")


class _TemplateKwarg(argparse.Action):
    """A flag that sets template variables, in command-line order as llama-server's
    default_template_kwargs (a later flag overrides an earlier one's key)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = dict(getattr(namespace, "template_kwargs", None) or {})
        if option_string == "--chat-template-kwargs":
            try:
                parsed = json.loads(values)
            except ValueError as e:
                parser.error(f"--chat-template-kwargs: not JSON: {e}")
            if not isinstance(parsed, dict):
                parser.error("--chat-template-kwargs must be a JSON object")
            for k in ("enable_thinking", "preserve_reasoning"):
                if k in parsed:
                    log.warning("setting %r via --chat-template-kwargs is deprecated (llama-server: use "
                                "--reasoning / --reasoning-preserve)", k)
            kw.update(parsed)
        elif option_string in ("-rea", "--reasoning"):
            v = values.lower()
            if v in _TRUTHY:
                kw["enable_thinking"] = True
            elif v in _FALSEY:
                kw["enable_thinking"] = False
            elif v not in _AUTOY:
                parser.error(f"unknown value for --reasoning: {values!r} (on, off or auto)")
        elif option_string == "--reasoning-effort":
            if values == "default":
                kw.pop("reasoning_effort", None)
            else:
                kw["reasoning_effort"] = values
        else:  # --reasoning-preserve / --no-reasoning-preserve
            kw["preserve_reasoning"] = option_string == "--reasoning-preserve"
        namespace.template_kwargs = kw


def _budget(value: str) -> int:
    n = int(value)
    if n < -1:
        raise argparse.ArgumentTypeError("must be -1 (unlimited), 0 or a count of tokens")
    return n


class _ChatTemplateFile(argparse.Action):
    """--chat-template-file FNAME: read the file now; like llama-server, the last of
    --chat-template / --chat-template-file wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            with open(values, encoding="utf-8") as f:
                namespace.chat_template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"{option_string}: {e}")
        namespace.chat_template_from = f"{option_string} {values}"


class _ChatTemplate(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.chat_template = values
        namespace.chat_template_from = option_string


def add_chat_flags(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """This module's flags, added to the parser (or a group of it) `g`."""
    g.add_argument("--chat-template", action=_ChatTemplate, default=None, metavar="JINJA_TEMPLATE",
                   help="a Jinja chat template text, or one of llama.cpp's built-in template names "
                        "(default: the model's, else a plain 'User: ... / Assistant:' transcript)")
    g.add_argument("--chat-template-file", action=_ChatTemplateFile, dest="chat_template", metavar="JINJA_TEMPLATE_FILE",
                   help="read --chat-template's text from a file")
    g.add_argument("--jinja", dest="jinja", action="store_true", default=True,
                   help="render chat templates with Jinja (jinja2, sandboxed), as Hugging Face does (default)")
    g.add_argument("--no-jinja", dest="jinja", action="store_false",
                   help="use llama.cpp's built-in template guesser instead (llama_chat_apply_template)")
    g.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="auto",
                   help="where a chat's thinking goes: 'none' leaves it in content, 'deepseek' / 'auto' put it in "
                        "message.reasoning_content, 'deepseek-legacy' also keeps it in content (default: auto)")
    g.set_defaults(template_kwargs={})
    g.add_argument("-rea", "--reasoning", action=_TemplateKwarg, metavar="[on|off|auto]",
                   help="use reasoning/thinking in the chat: on/off set the template's enable_thinking, "
                        "auto leaves the template's default (default: auto)")
    g.add_argument("--reasoning-effort", action=_TemplateKwarg, metavar="LEVEL",
                   help="reasoning effort given to the chat template (reasoning_effort): 'default' keeps "
                        "the template's, or a level such as low, medium, high (default: default)")
    g.add_argument("--reasoning-preserve", "--no-reasoning-preserve", action=_TemplateKwarg, nargs=0,
                   help="preserve_reasoning for templates that can keep the thinking of earlier turns")
    g.add_argument("--chat-template-kwargs", action=_TemplateKwarg, metavar="STRING",
                   help="extra variables for the chat template, a JSON object, e.g. '{\"key1\":\"value1\"}' "
                        "(a request's chat_template_kwargs override them)")
    g.add_argument("--reasoning-budget", type=_budget, default=-1, metavar="N",
                   help="token budget for thinking: -1 unrestricted, 0 ends the block at once, N > 0 closes "
                        "it after N tokens with the template's end tag (default: -1)")
    g.add_argument("--reasoning-budget-message", default="", metavar="MESSAGE",
                   help="text written before the end-of-thinking tag when the budget runs out (default: none)")
    g.add_argument("--skip-chat-parsing", dest="skip_chat_parsing", action="store_true", default=False,
                   help="the answer is all content: no reasoning split, no tool-call grammar or parsing")
    g.add_argument("--no-skip-chat-parsing", dest="skip_chat_parsing", action="store_false")
    g.add_argument("--prefill-assistant", dest="prefill_assistant", action="store_true", default=True,
                   help="a final assistant message is a prefill the model continues (default: enabled)")
    g.add_argument("--no-prefill-assistant", dest="prefill_assistant", action="store_false",
                   help="a final assistant message is a whole turn")
    g.add_argument("--responses-store", type=_mib, default=DEFAULT_STORE_MIB, metavar="MiB",
                   help="memory for stored OpenAI Responses (store: true; previous_response_id, GET/DELETE "
                        "/v1/responses/{id}); the least recently used go first; 0 stores none "
                        f"(default: {DEFAULT_STORE_MIB:g})")
    g.add_argument("--chat-continuations", dest="chat_continuations", action="store_true", default=True,
                   help="a chat prompt that repeats an earlier answer reuses the tokens the model generated, "
                        "so a resent conversation decodes only its new turn (default: enabled)")
    g.add_argument("--no-chat-continuations", dest="chat_continuations", action="store_false",
                   help="tokenize every chat prompt afresh")


def chat_options(args: argparse.Namespace) -> ChatOptions:
    """The ChatOptions the parsed command line means."""
    return ChatOptions(template_kwargs=dict(args.template_kwargs), reasoning_budget=args.reasoning_budget,
                       reasoning_budget_message=args.reasoning_budget_message,
                       skip_chat_parsing=args.skip_chat_parsing, prefill_assistant=args.prefill_assistant)


def _mib(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v <= 1 << 20:
        raise argparse.ArgumentTypeError(f"must be between 0 and {1 << 20} MiB")
    return v


def check_chat_template(args: argparse.Namespace) -> None:
    """--chat-template / --chat-template-file: a template that cannot even be compiled (Jinja
    syntax, or with --no-jinja one llama.cpp does not recognise) is a CLI error (exit 2)."""
    from ..chat.templates import BuiltinTemplate, JinjaTemplate, TemplateError
    import llama_lib

    text = args.chat_template
    if not text or text in llama_lib.builtin_chat_templates():
        return
    try:
        if args.jinja and "{{" not in text and "{%" not in text:  # a misspelt built-in name
            raise TemplateError("neither one of llama.cpp's built-in template names ("
                                f"{', '.join(llama_lib.builtin_chat_templates())}) nor a Jinja "
                                "template (no {{ or {%)")
        JinjaTemplate(text) if args.jinja else BuiltinTemplate(text)
    except TemplateError as e:
        what = args.chat_template_from or "--chat-template"
        shown = what if what != "--chat-template" else f"{what} {text[:40]!r}"
        args._parser.error(f"{shown}: {e}")
