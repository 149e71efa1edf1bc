"""Several completions in one request: `n` (llama-server's n_cmpl) and prompt lists.

As llama-server's tasks and child tasks: one engine request per prompt and completion, the
k-th completion of a prompt sampling with seed + k. Whole answers are merged by the job's
shape (server.api.shapes; the Service runs them to the end); streams interleave the choices'
events. Handles come in already submitted: nothing here calls the Service.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Any, Callable, Iterator

from .job import Job
from .shapes import DONE, AnswerContext, shape_for
from .shapes.common import new_id
from .stream import PING, handle_events, ping_wait

log = logging.getLogger("server")


class HandleGroup:
    """Several engine handles watched and waited on as one: the client going away cancels
    them all."""

    def __init__(self, handles: list):
        self.handles = handles

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def wait(self) -> None:
        for h in self.handles:
            h.wait()


def new_job_id(job: Job) -> str:
    return new_id(shape_for(job.kind).id_prefix)


def expand(job: Job) -> list[Job]:
    """One job per prompt and completion, prompt by prompt, n each; the k-th completion of a
    prompt samples with seed + k (a random seed stays random) and may run in any slot (only
    the first keeps id_slot). A single prompt with n = 1 is the job itself."""
    prompts = job.prompts or [job.prompt]
    if len(prompts) == 1 and job.n_cmpl == 1:
        return [job]
    job = dataclasses.replace(job, id=new_job_id(job))  # the choices share the request's id
    out = []
    for p in prompts:
        for k in range(job.n_cmpl):
            # a copy of the fields submit() or the sampler change; the rest is shared
            sp = job.params.sampling
            seed = sp.seed if k == 0 or sp.seed is None else (sp.seed + k) % 2**32
            params = dataclasses.replace(
                job.params, stop=list(job.params.stop), slot=job.params.slot if k == 0 else None,
                sampling=dataclasses.replace(sp, seed=seed, logit_bias=dict(sp.logit_bias)))
            out.append(dataclasses.replace(job, prompt=p, params=params, prompts=(p,), n_cmpl=1,
                                           system_update=job.system_update if not out else None))
    return out


def submit_all(submit: Callable[[Job], Any], jobs: list[Job]) -> list:
    """Submit every job with `submit` (one engine handle each) or none: a refusal cancels
    those already queued."""
    handles = []
    try:
        for j in jobs:
            handles.append(submit(j))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


def stream_many(ctx: AnswerContext, jobs: list[Job], handles: list, watch) -> Iterator[object]:
    """Several handles' events interleaved as they come (each with its choice index):
    one thread per handle feeds a queue; `data: [DONE]` once, after all of them (in the
    formats that end with it)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    finished = object()

    def pump(i: int) -> None:
        try:
            for ev in handle_events(ctx, jobs[i], handles[i], index=i, done=False):
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
            wait = ping_wait(jobs[0])
            while left:
                try:
                    ev = events.get(timeout=wait)
                except queue.Empty:
                    yield PING
                    continue
                if ev is finished:
                    left -= 1
                else:
                    yield ev
        if shape_for(jobs[0].kind).ends_with_done:
            yield DONE
    finally:
        group.cancel()  # no-op when finished; frees the slots when the client went away
