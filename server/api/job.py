"""A parsed request: the `Job` (the engine's RequestParams plus how to answer), the server
defaults a request may override, and the request kinds (one per wire format, server.api.shapes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llama_lib import RequestParams, SamplingParams

from ..chat.options import ChatOptions
from ..chat.plan import ChatPlan

# How a job answers: llama-server's /completion shape, OpenAI's two shapes, Anthropic's Messages.
KIND_COMPLETION = "completion"
KIND_OAI_COMPLETION = "oai_completion"
KIND_OAI_CHAT = "oai_chat"
KIND_ANTHROPIC = "anthropic"  # Anthropic's Messages API (/v1/messages)
KIND_OAI_RESPONSES = "oai_responses"  # OpenAI's Responses API

# seconds a stream may stay silent before it gets an SSE comment (":"), llama-server's
# --sse-ping-interval default; -1 (or 0) sends none
SSE_PING_INTERVAL = 30


@dataclass
class Defaults:
    """Server-wide defaults a request may override (from the command line)."""

    n_predict: int = -1
    # --temp, --top-k, ..., -s and --grammar / --json-schema (the GBNF of requests with none);
    # llama.cpp's defaults (SamplingParams') unless given
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n_vocab: int = 1 << 30
    ignore_eos: bool = False
    cache_prompt: bool = True  # the default of a request's cache_prompt (--no-cache-prompt)
    reasoning_format: str = "auto"  # --reasoning-format: a chat request's default reasoning_format
    sse_ping_interval: int = SSE_PING_INTERVAL  # --sse-ping-interval: a request's default
    chat: ChatOptions = field(default_factory=ChatOptions)  # the other chat flags (chat/options.py)
    n_keep: int = 0            # --keep: a request's default n_keep (context shift)
    n_cache_reuse: int = 0     # --cache-reuse: a request's default n_cache_reuse
    # --priority-min: the lowest (most urgent) `priority` a request may ask for; by default
    # clients may only yield (docs/scheduling.md)
    priority_min: int = 0

    @property
    def grammar(self) -> str | None:
        return self.sampling.grammar


@dataclass
class SystemUpdate:
    """server-parallel's fields: a new shared system prompt and the names around it."""

    system_prompt: str
    anti_prompt: str
    assistant_name: str


@dataclass(frozen=True)
class Job:
    """One generation request as parsed: what the engine runs (`params`, `prompt`) and how to
    answer. Frozen: a changed job is a new one (`dataclasses.replace`); its RequestParams are
    replaced too, never edited."""

    kind: str
    prompt: str | list[int]
    params: RequestParams
    stream: bool = False
    system_update: SystemUpdate | None = None
    # stop strings added to the request's and the server's anti-prompts (the chat fallback's)
    extra_stops: tuple[str, ...] = ()
    strip_leading: bool = False  # chat with the transcript fallback: drop the space after "Assistant:"
    include_usage: bool = False  # stream_options.include_usage: a chat stream ends with a usage chunk
    verbose: bool = False        # OpenAI shapes carry "__verbose" (the /completion object)
    return_tokens: bool = False  # /completion: the generated ids in "tokens"
    response_fields: tuple[str, ...] = ()  # /completion: keep only these ("a/b" nested)
    prompts: tuple[str | list[int], ...] = ()  # several prompts: one result each
    n_cmpl: int = 1              # n: completions per prompt (one slot each, seeds seed, seed+1, ...)
    chat: ChatPlan | None = None  # chat: how the answer is read (reasoning, tool calls)
    timings_per_token: bool = False  # every streamed event carries "timings"
    sse_ping_interval: int = SSE_PING_INTERVAL  # a stream silent this long (s) gets ":"; <= 0: never
    created: int = field(default_factory=lambda: int(time.time()))
    wire: Any = None  # what a format keeps beyond the chat (Responses: its conversation, the store)
    chat_text: str = ""  # a chat prompt the server tokenized: its rendered text (chat/continuations.py)
    id: str = ""
