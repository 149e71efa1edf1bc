"""What every wire format has in common: `Shape`, the base of one class per format, and
`AnswerContext`, what building an answer needs from the running server.

A shape turns an engine handle into its format's stream events (`opening`, `on_chunk`,
`ending`), its whole answer (`answer`) and the merge of several choices (`merge`); the stream
loop (server.api.stream) and the Service only call these, whatever the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

from llama_lib import FinishReason

from ...errors import ApiError
from ..job import Job
from .common import completion_result, final_probs, handle_error

DONE = object()  # in a stream: write `data: [DONE]`


@dataclass(frozen=True)
class Event:
    """A server-sent event with a name: `event: NAME` before its `data:` line (Anthropic's
    streams are read by event name; other formats yield plain dicts)."""

    name: str
    data: dict


@dataclass(frozen=True)
class AnswerContext:
    """The running server as plain data and callables, handed down by the Service (nothing
    below it calls back into it)."""

    model_name: str
    n_ctx_slot: int
    token_piece: Callable[[int], bytes]          # a token's bytes (probabilities' candidates)
    tokenize_text: Callable[[str], list[int]]    # no BOS, no special tokens (stop strings' length)
    prompt_text: Callable[[Any, Job], str]       # the prompt as decoded, special tokens written out
    closing: Callable[[], bool]                  # shutting down: a cancelled request is a 503
    record: Callable[[Any], None]                # count a finished handle in the metrics


class Shape:
    """One wire format. Class attributes say how its requests are read; an instance answers
    one choice (`index`) of one job."""

    kind: ClassVar[str]                       # Job.kind of this format (the routes name it)
    id_prefix: ClassVar[str] = "cmpl-"        # OpenAI's answer ids
    n_predict_names: ClassVar[tuple[str, ...]] = ("n_predict", "max_tokens")  # first one wins
    reads_messages: ClassVar[bool] = False    # a chat body (messages), else a prompt body
    takes_system_update: ClassVar[bool] = False  # server-parallel's system_prompt fields
    refuses_echo: ClassVar[bool] = False      # OpenAI's `echo` is refused (400)
    ends_with_done: ClassVar[bool] = True     # a stream ends with `data: [DONE]`
    shows_post_probs: ClassVar[bool] = False  # post_sampling_probs as "prob" (else log-probs)

    @classmethod
    def chat_body(cls, body: Any, info: Any) -> tuple[Any, Any]:
        """A chat format's body as a chat completions body, and what its shape keeps beyond it
        (`Job.wire`); OpenAI chat's own body as it is."""
        return body, None

    @classmethod
    def error_body(cls, e: ApiError) -> dict:
        """A refusal on this format's routes, in its error shape (llama-server's by default)."""
        return e.body()

    def __init__(self, job: Job, ctx: AnswerContext, index: int = 0):
        self.job = job
        self.ctx = ctx
        self.index = index

    # -- a stream -----------------------------------------------------------------------------

    def opening(self) -> Iterator[object]:
        """Events before the first chunk."""
        return iter(())

    def on_chunk(self, h, chunk, text: str, n_predicted: int) -> Iterator[object]:
        """Events for one engine chunk; `text` is its text after the leading-whitespace strip."""
        raise NotImplementedError

    def on_progress(self, h, progress, timings: dict | None) -> Iterator[object]:
        """Events for a prompt progress report (return_progress), `timings` with
        timings_per_token; a format without such an event sends nothing."""
        return iter(())

    def ending(self, h, done: bool) -> Iterator[object]:
        """The last events once the handle finished (`done`: this stream writes [DONE])."""
        raise NotImplementedError

    def failed(self, h) -> bool:
        """The handle ended in an error (or was cancelled by the shutdown): an error event."""
        return h.finish_reason == FinishReason.ERROR or (
            h.finish_reason == FinishReason.CANCELLED and self.ctx.closing())

    def error(self, h) -> dict:
        return handle_error(h, self.ctx.closing()).body()

    # -- whole answers ------------------------------------------------------------------------

    def answer(self, h, text: str) -> dict:
        """The non-streamed answer of one finished handle."""
        raise NotImplementedError

    def result_object(self, h, text: str) -> dict:
        """llama-server's /completion object for this choice, with the final probabilities."""
        c = self.ctx
        res = completion_result(h, self.job, c.model_name, c.n_ctx_slot, text,
                                c.prompt_text(h, self.job), self.index)
        if self.job.params.n_probs > 0:
            post = self.shows_post_probs and self.job.params.post_sampling_probs
            probs = final_probs(h, self.job, c.token_piece, c.tokenize_text, post)
            if probs:
                res["completion_probabilities"] = probs
        return res

    @classmethod
    def merge(cls, job: Job, answers: list[dict], handles: list) -> dict | list:
        """The answers of several choices (n > 1, several prompts) as one body."""
        raise NotImplementedError
