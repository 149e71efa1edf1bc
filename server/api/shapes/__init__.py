"""The wire formats, one class each (llama-server's /completion, OpenAI's completions, OpenAI's
chat, Anthropic's messages); `shape_for(kind)` is the server's one lookup by request kind.

A new format is one new file here (a `Shape` subclass with its own `kind`), its entry in
SHAPES, and its routes in server/http/routes.py.
"""

from __future__ import annotations

from .anthropic import AnthropicShape
from .base import DONE, AnswerContext, Event, Shape
from .completion import CompletionShape
from .oai_chat import OaiChatShape
from .oai_completion import OaiCompletionShape
from .responses import ResponsesShape

SHAPES: dict[str, type[Shape]] = {s.kind: s for s in (CompletionShape, OaiCompletionShape, OaiChatShape,
                                                      AnthropicShape, ResponsesShape)}


def shape_for(kind: str) -> type[Shape]:
    """The class of a request kind's wire format."""
    return SHAPES[kind]


__all__ = ["DONE", "SHAPES", "AnswerContext", "Event", "Shape", "shape_for"]
