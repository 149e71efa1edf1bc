"""Cores shared between processes: an engine (or a pool of them) told to run on a set of CPUs.

A router runs each model in a child process; two children decoding at once would each run a
thread team as wide as `-t` on the same cores, and their teams' barriers then wait on threads the
other team has descheduled. The router (server.router.cores) gives each busy child a disjoint
share of the cores and a lone busy child all of them; the child applies its share here: every
thread of the process is pinned to the share (cpuset.pin_process) and each context decodes with
min(its -t / -tb, CPUs in the share) threads (llama_set_n_threads). The thread counts are set on
the engine thread between two steps (Engine.call), as every call into a context is.
"""

from __future__ import annotations

from typing import Sequence

from .. import cpuset


def _contexts(engine) -> list:
    """The contexts an engine decodes with: its own, the embedding lanes', a draft model's."""
    out = [engine.ctx]
    if engine.embedder is not None:
        out.append(engine.embedder.ctx)
    drafter = getattr(engine.spec, "drafter", None)
    if drafter is not None:
        out.append(drafter.ctx)
    return out


def _set_threads(engine, n_cpus: int) -> tuple[int, int]:
    """On the engine thread: each context's threads, at most n_cpus (its configured count else)."""
    cp = engine.config.context
    n, nb = min(cp.n_threads, n_cpus), min(cp.n_threads_batch, n_cpus)
    for ctx in _contexts(engine):
        ctx.set_n_threads(n, nb)
    return n, nb


def share_cpus(engine, cpus: Sequence[int], timeout: float | None = 30.0) -> dict:
    """Run `engine` (an Engine or an EnginePool) on `cpus` from its next step on. An EnginePool's
    engines split the share (cpuset.split_cpus) for their thread counts. Returns what /props
    shows: {"cpus": "0-1", "n_threads": n, "n_threads_batch": nb}."""
    cpus = tuple(sorted(cpus))
    engines = getattr(engine, "engines", None) or [engine]
    shares = cpuset.split_cpus(cpus, len(engines))
    cpuset.pin_process(cpus)
    counts = [e.call(lambda e=e, s=s: _set_threads(e, len(s)), timeout) for e, s in zip(engines, shares)]
    return {"cpus": cpuset.format_cpus(cpus), "n_threads": sum(c[0] for c in counts),
            "n_threads_batch": sum(c[1] for c in counts)}
