"""OpenAI's text completions: `POST /v1/completions`.

Streamed: `text_completion` chunks with `choices[0].text`; the last one always carries `usage`
(and timings), as llama-server's, then [DONE]. Whole: one `text_completion` object.
"""

from __future__ import annotations

from typing import Iterator

from ..job import KIND_OAI_COMPLETION
from .common import progress_json, timings, usage
from .completion import chunk_probs
from .openai import OpenAIShape, oai_finish_reason


class OaiCompletionShape(OpenAIShape):
    kind = KIND_OAI_COMPLETION
    n_predict_names = ("max_tokens", "n_predict")
    refuses_echo = True
    obj = "text_completion"

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        out = self.head(self.obj)
        out["choices"] = [{"text": text, "index": self.index, "logprobs": None, "finish_reason": finish_reason}]
        return out

    def on_chunk(self, h, chunk, text: str, n_predicted: int) -> Iterator[object]:
        if not text:
            return
        ev = self.chunk(text)
        if chunk.probs:
            ev["choices"][0]["logprobs"] = {"content": chunk_probs(chunk, text, self.ctx.token_piece)}
        yield ev

    def on_progress(self, h, progress, timings: dict | None) -> Iterator[object]:
        ev = self.chunk("")
        if timings is not None:
            ev["timings"] = timings
        ev["prompt_progress"] = progress_json(progress)
        yield ev

    def last_chunks(self, h) -> Iterator[dict]:
        last = self.chunk("", oai_finish_reason(h.finish_reason))
        last["usage"] = usage(h)
        verbose = self.verbose(h)
        if verbose is not None:
            last["__verbose"] = verbose
        last["timings"] = timings(h)
        yield last

    def answer(self, h, text: str) -> dict:
        return self.whole(h, self.result_object(h, text), {"text": text, "index": self.index})
