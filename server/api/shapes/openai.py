"""What OpenAI's two formats share: the answer head (id, object, created, model, fingerprint),
finish reasons, the whole answer with usage and timings, the merge of several choices, and a
stream's error ending."""

from __future__ import annotations

from typing import Iterator

from llama_lib import FinishReason, llama_build_info

from ..job import Job
from .base import DONE, Shape
from .common import completion_result, timings, usage


def oai_finish_reason(reason: FinishReason | None) -> str | None:
    if reason in (FinishReason.EOS, FinishReason.STOP):
        return "stop"
    if reason == FinishReason.LENGTH:
        return "length"
    return None


class OpenAIShape(Shape):
    obj = ""        # "text_completion" / "chat.completion"
    chunk_obj = ""  # the object of a stream's chunks

    def head(self, obj: str) -> dict:
        job = self.job
        return {"id": job.id, "object": obj, "created": job.created, "model": self.ctx.model_name,
                # llama-server's: the libllama build, "b<build number>-<commit>" (clients check the "b")
                "system_fingerprint": llama_build_info()}

    def ending(self, h, done: bool) -> Iterator[object]:
        if self.failed(h):
            yield self.error(h)
        else:
            yield from self.last_chunks(h)
        if done:
            yield DONE

    def last_chunks(self, h) -> Iterator[dict]:
        """The final chunks of a stream that did not fail."""
        raise NotImplementedError

    def verbose(self, h) -> dict | None:
        """"__verbose" (the /completion object) when the job asked for it."""
        if not self.job.verbose:
            return None
        c, job = self.ctx, self.job
        return completion_result(h, job, c.model_name, c.n_ctx_slot, "", c.prompt_text(h, job), self.index)

    def whole(self, h, res: dict, choice: dict, finish_reason: str | None = None) -> dict:
        """A whole answer: one choice, usage, "__verbose" (the /completion object `res`) when
        the job asked for it, then llama-server's timings."""
        out = self.head(self.obj)
        out["choices"] = [{**choice, "logprobs": None,
                           "finish_reason": finish_reason or oai_finish_reason(h.finish_reason)}]
        out["usage"] = usage(h)
        if self.job.verbose:
            out["__verbose"] = res
        out["timings"] = timings(h)
        probs = res.get("completion_probabilities")
        if probs:
            out["choices"][0]["logprobs"] = {"content": probs}
        return out

    @classmethod
    def merge(cls, job: Job, answers: list[dict], handles: list) -> dict:
        """One answer with a choice each; usage covers every choice, a prompt's tokens
        counting once however many completions it has."""
        out = answers[0]
        out["choices"] = [a["choices"][0] for a in answers]
        firsts = [h for i, h in enumerate(handles) if i % job.n_cmpl == 0]
        n_gen = sum(h.n_generated for h in handles)
        n_prompt = sum(h.n_cached_tokens + h.n_prompt_tokens for h in firsts)
        out["usage"] = {"completion_tokens": n_gen, "prompt_tokens": n_prompt,
                        "total_tokens": n_gen + n_prompt,
                        "prompt_tokens_details": {"cached_tokens": sum(h.n_cached_tokens for h in firsts)}}
        return out
