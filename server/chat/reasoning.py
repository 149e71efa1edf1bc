"""Split a chat model's generated text into reasoning and content, as llama-server does.

Thinking models write their chain of thought between markers their chat template knows
("<think>" ... "</think>" and relatives); llama-server's ``--reasoning-format`` moves that
text out of ``message.content`` into ``message.reasoning_content`` (streamed as
``delta.reasoning_content``).  This module finds the markers from the template source and
splits generated text, also while it is still being generated: the server streams only the
growth of each part, so a split of a prefix must never need taking back.

Not split (``detect_markers`` gives None): gpt-oss's harmony channels, and templates whose
whole output is a tag protocol (Kimi K3's ``<|open|>think<|sep|>``, Solar Open's
``<|think|>...<|end|>``, muse-glimmer's ``to=self`` channel), where the content that follows
the reasoning is itself wrapped and a plain marker split would not give clean content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REASONING_FORMATS = ("none", "deepseek", "deepseek-legacy", "auto")  # --reasoning-format; "auto" is the default


@dataclass(frozen=True)
class ThinkMarkers:
    """The text that opens and the text that closes a model's reasoning."""

    start: str
    end: str


THINK = ThinkMarkers("<think>", "</think>")

# (text whose presence in the template source identifies it, markers), most specific first:
# a template mentions the closing marker when it writes it or strips thinking from old turns.
_KNOWN: tuple[tuple[str, ThinkMarkers], ...] = (
    ("</seed:think>", ThinkMarkers("<seed:think>", "</seed:think>")),            # Seed-OSS
    ("</mm:think>", ThinkMarkers("<mm:think>", "</mm:think>")),                  # MiniMax M3
    ("<|END_THINKING|>", ThinkMarkers("<|START_THINKING|>", "<|END_THINKING|>")),  # Command R7B
    ("[/THINK]", ThinkMarkers("[THINK]", "[/THINK]")),                           # Magistral
    ("<channel|>", ThinkMarkers("<|channel>thought", "<channel|>")),             # Gemma 4
    ("<|inner_suffix|>", ThinkMarkers("<|inner_prefix|>", "<|inner_suffix|>")),  # Apertus
    ("[BEGIN FINAL RESPONSE]",                                               # Apriel 1.5, 1.6
     ThinkMarkers("Here are my reasoning steps:", "[BEGIN FINAL RESPONSE]")),
    ("</think>", THINK),                        # Qwen3, QwQ, DeepSeek R1, GLM, SmolLM3, ...
)

# gpt-oss: reasoning lives in harmony channels, a different protocol (not split here).
_HARMONY = "<|channel|>"
# Hunyuan (tencent-Hy3) builds its tags as '<think{}>'.format(HYTK) with HYTK = ':opensource'.
_FORMATTED_END = re.compile(r"""['"]</think\{\}>['"]\s*\.format\(\s*(\w+)\s*\)""")


def detect_markers(template_text: str) -> ThinkMarkers | None:
    """The thinking markers a chat template (its Jinja source text) uses, or None.

    Looked up by the closing marker, which a thinking template writes or strips out of
    earlier assistant turns; a template with none of them is treated as not thinking.
    """
    if _HARMONY in template_text:
        return None
    formatted = _FORMATTED_END.search(template_text)
    if formatted:
        suffix = re.search(r"""set\s+%s\s*=\s*['"]([^'"]*)['"]""" % formatted.group(1), template_text)
        if suffix:
            return ThinkMarkers(f"<think{suffix.group(1)}>", f"</think{suffix.group(1)}>")
    for needle, markers in _KNOWN:
        if needle in template_text:
            return markers
    return None


def prompt_opens(prompt: str, markers: ThinkMarkers | None) -> bool:
    """True when the rendered prompt already ends with the start marker (ignoring trailing
    whitespace), e.g. Qwen3 / DeepSeek-R1-distill templates that write "<think>\\n" after the
    generation prompt: the model's text then begins inside the reasoning.

    Such a model never writes the start marker itself, so without this the whole reasoning
    would land in the content.
    """
    return markers is not None and prompt.rstrip().endswith(markers.start)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``: text a
    stream must hold back because the next tokens may complete the marker."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _split_body(body: str, end: str, final: bool) -> tuple[str, str]:
    """(reasoning, content) of ``body``, the text after the start marker."""
    cut = body.find(end)
    if cut >= 0:
        # llama.cpp drops the whitespace around the reasoning and after the end marker.
        return body[:cut].strip(), body[cut + len(end):].lstrip()
    if final:  # the end marker never came: it is all reasoning
        return body.strip(), ""
    # Still streaming: hold back a partial end marker and the whitespace before it, whose
    # fate (stripped before the end marker, or kept inside the reasoning) is not yet known.
    reasoning = body.lstrip()
    held = _partial_suffix(reasoning, end)
    return reasoning[:len(reasoning) - held].rstrip(), ""


def split_reasoning(text: str, markers: ThinkMarkers | None, opened: bool, final: bool,
                    fmt: str = "auto") -> tuple[str, str]:
    """(reasoning, content) of the generated text so far.

    ``opened``: the prompt ended with the start marker (see prompt_opens), so the text begins
    inside the reasoning; otherwise reasoning only starts if the text, after optional leading
    whitespace, begins with ``markers.start``.  While ``final`` is False, text that could still
    turn out either way (a partial marker, whitespace that may be stripped) is held back, so
    each part of a prefix's split is a prefix of the same part of any longer text's split:
    what the server has streamed never has to be retracted.  ``fmt`` is llama-server's
    reasoning format: "none" leaves everything in the content, "deepseek-legacy" fills the
    reasoning but keeps the whole original text as the content.
    """
    if fmt not in REASONING_FORMATS:
        raise ValueError(f"unknown reasoning format {fmt!r}; expected one of {REASONING_FORMATS}")
    if markers is None or fmt == "none":
        return "", text
    legacy = fmt == "deepseek-legacy"  # the content is the original text, markers and all
    stripped = text.lstrip()
    if opened:
        body = text
    elif stripped.startswith(markers.start):
        body = stripped[len(markers.start):]
    elif not final and markers.start.startswith(stripped):
        return "", (text if legacy else "")  # may yet become the start marker
    else:
        return "", text  # a start marker later on is plain content
    reasoning, content = _split_body(body, markers.end, final)
    return reasoning, (text if legacy else content)
