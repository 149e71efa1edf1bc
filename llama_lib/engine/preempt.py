"""Preemption that parks a request's KV instead of throwing it away (docs/scheduling.md).

At the start of a step, when every slot is busy and the request the queue would serve next
(waiting.py's order) has waited EngineConfig.preempt_after_ms, a running request gives up its
slot if it has a worse priority (a higher number), or, under the fair schedule, if its user runs
at least two more requests than the waiter's user and has had more tokens. The victim's KV
sequence is saved to host RAM (llama_state_seq_get_data) with everything its slot knew (position,
sampler with its RNG and penalty history, stop matcher, pending token), its cells are freed, and
it waits in the queue again under its old id. When the queue gives it a slot, any slot, its
sequence is loaded back (llama_state_seq_set_data) and it goes on from the token it had sampled:
nothing is decoded twice, and its stream simply pauses. A greedy request's output is token for
token what it is without preemption.

A parked request lives outside the KV cache, so a full cache cannot take it; if its state does
not load back (no room even after the prompt cache's idle prefixes are evicted), it stays parked
and waits for a request to end. A cancelled parked request leaves the queue as any waiting one.
Engine thread only (the queue is read under the engine's lock).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..sampler import Sampler
from .output import StopMatcher
from .parts import StepParts
from .request import Request
from .slot import GENERATE, Slot
from .waiting import WaitingQueue, user_of

log = logging.getLogger("llama_lib.engine")


@dataclass(eq=False)
class Parked:
    """A preempted request's slot state and KV sequence (bytes in host RAM)."""

    data: bytes | None
    n_past: int
    n_prefix: int
    prefix_version: int
    prompt_pos: int
    sampled: int
    shift_keep: int
    n_shifted: int
    cache_hit: tuple[str, int]
    sampler: Sampler | None
    matcher: StopMatcher | None
    t_parked: float

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self.data = None


@dataclass
class PreemptStats:
    n_preempted: int = 0     # requests parked
    n_resumed: int = 0       # parked requests back in a slot
    n_load_failed: int = 0   # resumes that found no KV room (the request stayed parked)


class Scheduler:
    """Preemption and resumption over the engine's parts and waiting queue."""

    def __init__(self, parts: StepParts, queue: WaitingQueue, lock: threading.Lock, preempt_after_ms: int):
        self.p = parts
        self.queue = queue
        self.lock = lock
        self.after_s = preempt_after_ms / 1e3 if preempt_after_ms >= 0 else -1.0
        self.stats = PreemptStats()

    @property
    def n_parked_bytes(self) -> int:
        return sum(len(r.parked.data or b"") for r in list(self.queue) if r.parked is not None)

    # -- preemption -----------------------------------------------------------------------------

    def preempt(self) -> None:
        """Park a running request for the queue's next one, when the rules above say so."""
        slots = self.p.slots
        if self.after_s < 0 or any(s.req is None for s in slots):
            return
        now = time.perf_counter()
        with self.lock:
            if self._one_user():
                return
            self.queue.account()
            waiter = self.queue.best(skip=lambda r: r.params.slot is not None)
            if waiter is None:
                return
            since = waiter.parked.t_parked if waiter.parked is not None else waiter.timings.submitted
            if now - since < self.after_s:
                return
            victim = self._victim(waiter)
        if victim is None:
            return
        r = self.park(victim, now)
        with self.lock:
            self.queue.park(r)
        log.info("slot %d: request %d (user %r, priority %d) parked for request %d (user %r, priority %d)",
                 victim.id, r.id, user_of(r), r.params.priority, waiter.id, user_of(waiter),
                 waiter.params.priority)

    def _one_user(self) -> bool:
        """Nobody to be fair to: one user everywhere and every priority 0 (the common case,
        checked in O(slots) so a lone user's steps cost nothing more)."""
        if not self.queue.simple:
            return False
        waiting = next(iter(self.queue), None)
        if waiting is None:
            return True
        u = user_of(waiting)
        return all(s.req is None or (user_of(s.req) == u and not s.req.params.priority) for s in self.p.slots)

    def _victim(self, waiter: Request) -> Slot | None:
        """The running request to park for `waiter`: the worst priority, then the user with
        the most slots, then the latest started; None when no one qualifies."""
        slots = self.p.slots
        counts = collections.Counter(user_of(s.req) for s in slots if s.req is not None)
        wkey = self.queue.key(waiter)
        wprio, wuser = waiter.params.priority, user_of(waiter)
        best, best_key = None, None
        for s in slots:
            r = s.req
            if r is None or s.phase is not GENERATE or s.hold_at or r._cancel.is_set():
                continue
            if any(o.follow is s for o in slots):  # a leader others copy a prefix from
                continue
            if self.queue.key(r) <= wkey:
                continue
            prio = r.params.priority
            if not (prio > wprio or (self.queue.fair and prio == wprio
                                     and counts[user_of(r)] >= counts[wuser] + 2)):
                continue
            k = (prio, counts[user_of(r)], r.timings.started)
            if best_key is None or k > best_key:
                best, best_key = s, k
        return best

    def park(self, s: Slot, now: float) -> Request:
        """Save the slot's sequence and state into its request (r.parked), free the slot."""
        p, r = self.p, s.req
        r.parked = Parked(p.ctx.seq_state(s.seq_id), s.n_past, s.n_prefix, s.prefix_version,
                          s.prompt_pos, s.sampled, s.shift_keep, s.n_shifted, s.cache_hit,
                          s.sampler, s.matcher, now)
        s.sampler = None  # the parked request keeps it
        s.end(now)
        p.cache.seqs.reset_to_default(s)
        self.stats.n_preempted += 1
        return r

    # -- resumption -----------------------------------------------------------------------------

    def resume(self, chosen: list[tuple[Slot, Request]], slot_id_base: int) -> list[tuple[Slot, Request]]:
        """Resume the parked requests among the pairs WaitingQueue.take made; returns the others
        (new requests, for lifecycle.start_requests)."""
        if not any(r.parked is not None for _, r in chosen):
            return chosen
        fresh = []
        for s, r in chosen:
            if r.parked is None:
                fresh.append((s, r))
            elif not self._load(s, r, slot_id_base):
                s.req = None  # back to waiting, still parked
                with self.lock:
                    self.queue.account()
                    self.queue.append(r)
        return fresh

    def _load(self, s: Slot, r: Request, slot_id_base: int) -> bool:
        p, pk = self.p, r.parked
        mem = p.memory
        p.cache.keep_aside(s)  # the idle slot's own cache to a holder or RAM first
        ok = False
        while True:
            mem.seq_rm(s.seq_id, -1, -1)
            ok = p.ctx.set_seq_state(s.seq_id, pk.data) and mem.seq_pos_max(s.seq_id) == pk.n_past - 1
            if ok or not p.cache.evict():
                break
        if not ok:
            self.stats.n_load_failed += 1
            log.warning("slot %d: parked request %d found no KV room; it waits", s.id, r.id)
            p.cache.seqs.reset_to_default(s)
            return False
        if s.sampler is not None:
            s.sampler.close()
        s.cache_tokens = np.zeros(0, np.int32)
        s.n_past, s.n_prefix, s.prefix_version = pk.n_past, pk.n_prefix, pk.prefix_version
        s.prompt_pos, s.sampled = pk.prompt_pos, pk.sampled
        s.shift_keep, s.n_shifted, s.cache_hit = pk.shift_keep, pk.n_shifted, pk.cache_hit
        s.sampler, s.matcher = pk.sampler, pk.matcher
        s.i_batch = -1
        s.kv_pos_max = pk.n_past - 1
        s.phase = GENERATE
        s.req = r
        r.slot_id = s.id + slot_id_base
        pk.sampler = None
        pk.data = None
        r.parked = None
        self.stats.n_resumed += 1
        return True
