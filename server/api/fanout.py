"""Several completions in one request: `n` (llama-server's n_cmpl) and prompt lists.

As llama-server's tasks and child tasks: one engine request per prompt and completion, the
k-th completion of a prompt sampling with seed + k. Answers are merged (OpenAI: one object
with a choice each; /completion: a list); streams interleave the choices' events.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Iterator, Protocol

from llama_lib import FinishReason

from . import responses as R
from ..errors import ClientGone
from .stream import DONE, Streamer, handle_events
from .requests import KIND_COMPLETION, KIND_OAI_CHAT, Job

log = logging.getLogger("server")


class Runner(Streamer, Protocol):
    def submit(self, job: Job):
        """Hand one job to the engine; its Request handle. Raises ApiError."""


class HandleGroup:
    """Several engine handles watched as one: the client going away cancels them all."""

    def __init__(self, handles: list):
        self.handles = handles

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


def new_job_id(job: Job) -> str:
    return R.new_id("chatcmpl-" if job.kind == KIND_OAI_CHAT else "cmpl-")


def expand(job: Job) -> list[Job]:
    """One job per prompt and completion, prompt by prompt, n each; the k-th completion of a
    prompt samples with seed + k (a random seed stays random) and may run in any slot (only
    the first keeps id_slot). A single prompt with n = 1 is the job itself."""
    prompts = job.prompts or [job.prompt]
    if len(prompts) == 1 and job.n_cmpl == 1:
        return [job]
    job.id = new_job_id(job)  # the choices share the request's id
    out = []
    for p in prompts:
        for k in range(job.n_cmpl):
            # a copy of the fields submit() or the sampler change; the rest is shared
            sp = job.params.sampling
            seed = sp.seed if k == 0 or sp.seed is None else (sp.seed + k) % 2**32
            params = dataclasses.replace(
                job.params, stop=list(job.params.stop), slot=job.params.slot if k == 0 else None,
                sampling=dataclasses.replace(sp, seed=seed, logit_bias=dict(sp.logit_bias)))
            out.append(dataclasses.replace(job, prompt=p, params=params, prompts=[p], n_cmpl=1,
                                           system_update=job.system_update if not out else None))
    return out


def submit_all(srv: Runner, jobs: list[Job]) -> list:
    """Submit every job or none: a refusal cancels those already queued."""
    handles = []
    try:
        for j in jobs:
            handles.append(srv.submit(j))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


def complete_many(srv: Runner, job: Job, jobs: list[Job], watch) -> dict | list:
    """Run the expanded jobs to the end and merge their answers (see Service.complete)."""
    handles = submit_all(srv, jobs)
    group = HandleGroup(handles)
    try:
        with watch(group) as gone:
            for h in handles:
                h.wait()
    finally:
        group.cancel()
    for h in handles:
        srv.record(h)
    if gone and any(h.finish_reason == FinishReason.CANCELLED for h in handles):
        raise ClientGone()
    for h in handles:
        if h.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            raise R.handle_error(h, srv.closing)
    results = [R.result(srv, h, j, h.text.lstrip() if j.strip_leading else h.text, i)
               for i, (h, j) in enumerate(zip(handles, jobs))]
    if job.kind == KIND_COMPLETION:
        return results
    out = results[0]
    out["choices"] = [r["choices"][0] for r in results]
    # usage covers every choice; a prompt's tokens count once however many completions
    firsts = [h for i, h in enumerate(handles) if i % job.n_cmpl == 0]
    n_gen = sum(h.n_generated for h in handles)
    n_prompt = sum(h.n_cached_tokens + h.n_prompt_tokens for h in firsts)
    out["usage"] = {"completion_tokens": n_gen, "prompt_tokens": n_prompt,
                    "total_tokens": n_gen + n_prompt,
                    "prompt_tokens_details": {"cached_tokens": sum(h.n_cached_tokens for h in firsts)}}
    return out


def stream_many(srv: Runner, jobs: list[Job], handles: list, watch) -> Iterator[object]:
    """Several handles' events interleaved as they come (each with its choice index):
    one thread per handle feeds a queue; `data: [DONE]` once, after all of them."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    finished = object()

    def pump(i: int) -> None:
        try:
            for ev in handle_events(srv, jobs[i], handles[i], index=i, done=False):
                events.put(ev)
        except Exception:
            log.exception("stream of choice %d failed", i)
            handles[i].cancel()
        finally:
            events.put(finished)

    group = HandleGroup(handles)
    try:
        with watch(group):
            for i in range(len(handles)):
                threading.Thread(target=pump, args=(i,), name=f"stream-choice-{i}", daemon=True).start()
            left = len(handles)
            while left:
                ev = events.get()
                if ev is finished:
                    left -= 1
                else:
                    yield ev
        if jobs[0].kind != KIND_COMPLETION:
            yield DONE
    finally:
        group.cancel()  # no-op when finished; frees the slots when the client went away
