"""Chat flags, as llama-server names them: where the chat template comes from, whether Jinja
renders it, and where a chat's thinking goes. `check_chat_template` makes a template that
cannot even be compiled a CLI error (exit 2) rather than a failure on the first request."""

from __future__ import annotations

import argparse

from ..api.response_store import DEFAULT_STORE_MIB
from ..chat.reasoning import REASONING_FORMATS


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
    g.add_argument("--responses-store", type=_mib, default=DEFAULT_STORE_MIB, metavar="MiB",
                   help="memory for stored OpenAI Responses (store: true; previous_response_id, GET/DELETE "
                        "/v1/responses/{id}); the least recently used go first; 0 stores none "
                        f"(default: {DEFAULT_STORE_MIB:g})")


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
