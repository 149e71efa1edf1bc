"""A parsed request: the `Job` (the engine's RequestParams plus how to answer), the server
defaults a request may override, and the request kinds (one per wire format, server.api.shapes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llama_lib import RequestParams, SamplingParams

from ..chat.plan import ChatPlan

# How a job answers: llama-server's /completion shape, or OpenAI's two shapes.
KIND_COMPLETION = "completion"
KIND_OAI_COMPLETION = "oai_completion"
KIND_OAI_CHAT = "oai_chat"


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
    n_keep: int = 0            # --keep: a request's default n_keep (context shift)
    n_cache_reuse: int = 0     # --cache-reuse: a request's default n_cache_reuse

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
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
