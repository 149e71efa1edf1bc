"""llama-server's own format: `POST /completion` (and /completions).

Streamed: one object per chunk (`content`, `tokens`, `completion_probabilities`), then the full
result object with `"stop": true` and `"content": ""`, no [DONE]. Whole: the result object,
projected onto `response_fields`; several choices answer as a list of them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from ..job import KIND_COMPLETION, Job
from .base import Shape
from .common import completion_result, probs_json, progress_json, project_fields


class CompletionShape(Shape):
    kind = KIND_COMPLETION
    takes_system_update = True
    ends_with_done = False
    shows_post_probs = True

    def on_chunk(self, h, chunk, text: str, n_predicted: int) -> Iterator[object]:
        ev = {
            "index": self.index,
            "content": text,
            "tokens": chunk.tokens,
            "stop": False,
            "id_slot": h.slot_id,
            "tokens_predicted": n_predicted,
            "tokens_evaluated": h.n_cached_tokens + h.n_prompt_tokens,
        }
        if chunk.probs:
            ev["completion_probabilities"] = chunk_probs(chunk, text, self.ctx.token_piece,
                                                         self.job.params.post_sampling_probs)
        yield ev

    def on_progress(self, h, progress, timings: dict | None) -> Iterator[object]:
        # llama-server's progress partial: no text, its token list holds a 0 (an empty token)
        ev = {"index": self.index, "content": "", "tokens": [0], "stop": False, "id_slot": h.slot_id,
              "tokens_predicted": 0, "tokens_evaluated": progress.total}
        if timings is not None:
            ev["timings"] = timings
        ev["prompt_progress"] = progress_json(progress)
        yield ev

    def ending(self, h, done: bool) -> Iterator[object]:
        c, job = self.ctx, self.job
        final = completion_result(h, job, c.model_name, c.n_ctx_slot, "", c.prompt_text(h, job), self.index)
        final = project_fields(final, job.response_fields)
        if self.failed(h):
            final["error"] = self.error(h)["error"]
        yield final

    def answer(self, h, text: str) -> dict:
        return project_fields(self.result_object(h, text), self.job.response_fields)

    @classmethod
    def merge(cls, job: Job, answers: list[dict], handles: list) -> list:
        return answers


def chunk_probs(chunk, text: str, piece, post: bool = False) -> list[dict]:
    """A streamed chunk's probabilities; a chunk is one token, sent with `text` (its text
    after the leading-whitespace strip, if any)."""
    entries = chunk.probs
    if len(entries) == 1 and entries[0].text != text:
        entries = [dataclasses.replace(entries[0], text=text)]
    return probs_json(entries, piece, post=post)
