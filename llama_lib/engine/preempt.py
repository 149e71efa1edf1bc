"""Preemption that parks a request's KV instead of throwing it away (docs/scheduling.md).

At the start of a step, when every slot is busy and the request the queue would serve next
(waiting.py's order) has waited EngineConfig.preempt_after_ms, a running request gives up its
slot if it has a worse priority (a higher number), or, under the fair schedule, if its user runs
at least two more requests than the waiter's user and has had more tokens. The victim's KV
sequence is parked: with a unified KV cache in a holder sequence lent by holders.py
(llama_memory_seq_cp: its cells tagged, nothing copied), else as bytes in host RAM
(llama_state_seq_get_data); with it goes everything its slot knew (position, sampler with its
RNG and penalty history, stop matcher, pending token). The slot is freed and the request waits
in the queue again under its old id. When the queue gives it a slot, any slot, its sequence is
tagged or loaded back (llama_state_seq_set_data) and it goes on from the token it had sampled:
nothing is decoded twice, and its stream simply pauses. A greedy request's output is token for
token what it is without preemption.

A full KV cache cannot lose a parked request: when a decode finds no room and no idle prefix is
left to evict, the one parked longest in a holder moves to host RAM (`evict_one`, the prompt
cache's last resort). If a RAM state does not load back (no room even after evicting), it stays
parked and waits for a request to end. A cancelled parked request leaves the queue as any
waiting one. Engine thread only (the queue is read under the engine's lock).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..sampler import Sampler
from .output import StopMatcher
from .parts import StepParts
from .ram_cache import RamCache
from .request import Request
from .slot import GENERATE, PREFILL, Slot, SlotPhase
from .waiting import WaitingQueue, user_of

log = logging.getLogger("llama_lib.engine")


@dataclass(eq=False)
class Parked:
    """A preempted request's slot state and KV sequence: in a lent holder sequence (`seq`,
    unified KV: its cells tagged, nothing copied) or as bytes in host RAM (`data`)."""

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
    seq: int = -1                  # the holder sequence that keeps its cells; -1: `data` does
    give_back: Callable[[int], None] | None = None  # returns `seq` to the holders
    phase: SlotPhase = GENERATE    # PREFILL: its prompt goes on from prompt_pos
    ram: RamCache | None = None    # the tier whose limit `data` is counted against

    def keep_bytes(self, data: bytes, ram: RamCache | None) -> None:
        """Hold the sequence as bytes, reserved against the host-RAM tier's limit."""
        self.data, self.ram = data, ram
        if ram is not None:
            ram.n_reserved += len(data)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.seq >= 0 and self.give_back is not None:
            self.give_back(self.seq)
        self.seq = -1
        if self.data is not None and self.ram is not None:
            self.ram.n_reserved -= len(self.data)
        self.data = None


@dataclass
class PreemptStats:
    n_preempted: int = 0     # requests parked
    n_resumed: int = 0       # parked requests back in a slot
    n_load_failed: int = 0   # resumes that found no KV room (the request stayed parked)
    n_in_holder: int = 0     # of the parked, those kept in a holder sequence (no copy)
    n_to_ram: int = 0        # parked in a holder, then moved to host RAM to make room in KV
    n_no_room: int = 0       # preemptions given up: the bytes would pass --cache-ram
    n_over_limit: int = 0    # holder-parked moved to RAM past --cache-ram (KV full: never lost)


class Scheduler:
    """Preemption and resumption over the engine's parts and waiting queue."""

    def __init__(self, parts: StepParts, queue: WaitingQueue, lock: threading.Lock, preempt_after_ms: int):
        self.p = parts
        self.queue = queue
        self.lock = lock
        self.after_s = preempt_after_ms / 1e3 if preempt_after_ms >= 0 else -1.0
        self.stats = PreemptStats()
        self.holders = parts.cache.holders  # with unified KV: park in a holder sequence first
        parts.cache.evict_parked = self.evict_one

    @property
    def n_parked_bytes(self) -> int:
        return sum(len(r.parked.data or b"") for r in list(self.queue) if r.parked is not None)

    # -- preemption -----------------------------------------------------------------------------

    def preempt(self) -> bool:
        """Park a running request for the queue's next one, when the rules above say so;
        True when one was parked."""
        slots = self.p.slots
        if self.after_s < 0 or any(s.req is None for s in slots):
            return False
        if self.holders is None and self.p.cache.ram is None:
            return False  # nowhere to park: no holder sequences, no host RAM (--cache-ram 0)
        now = time.perf_counter()
        with self.lock:
            if self._one_user():
                return False
            self.queue.account()
            waiter = self.queue.best(skip=lambda r: r.params.slot is not None)
            if waiter is None:
                return False
            since = waiter.parked.t_parked if waiter.parked is not None else waiter.timings.submitted
            if now - since < self.after_s:
                return False
            victim = self._victim(waiter)
        if victim is None:
            return False
        r = self.park(victim, now)
        if r is None:
            return False
        with self.lock:
            self.queue.park(r)
        log.info("slot %d: request %d (user %r, priority %d) parked for request %d (user %r, priority %d)",
                 victim.id, r.id, user_of(r), r.params.priority, waiter.id, user_of(waiter),
                 waiter.params.priority)
        return True

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
            if r is None or s.phase not in (GENERATE, PREFILL) or s.hold_at or r._cancel.is_set():
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

    def park(self, s: Slot, now: float) -> Request | None:
        """Save the slot's sequence and state into its request (r.parked), free the slot.
        None (nothing changed) when its bytes would not fit --cache-ram beside the tier's
        entries and the other parked requests."""
        p, r = self.p, s.req
        seq = self._hold(s)
        data, ram = None, p.cache.ram
        if seq < 0:
            size = p.ctx.seq_state_size(s.seq_id)
            if ram is None or not ram.make_room(size):
                self.stats.n_no_room += 1
                log.debug("slot %d: request %d not parked: %d bytes do not fit --cache-ram", s.id, r.id, size)
                return None
            data = p.ctx.seq_state(s.seq_id)
        r.parked = Parked(None, s.n_past, s.n_prefix, s.prefix_version, s.prompt_pos, s.sampled,
                          s.shift_keep, s.n_shifted, s.cache_hit, s.sampler, s.matcher, now, seq,
                          self.holders.take_back if self.holders is not None else None, s.phase)
        if data is not None:
            r.parked.keep_bytes(data, ram)
        s.sampler = None  # the parked request keeps it
        s.end(now)
        p.cache.seqs.reset_to_default(s)
        self.stats.n_preempted += 1
        return r

    def _hold(self, s: Slot) -> int:
        """Tag the slot's cells with a lent holder sequence (no copy); -1 when there is none."""
        if self.holders is None:
            return -1
        seq = self.holders.lend()
        if seq is None:
            return -1
        mem = self.p.memory
        mem.seq_cp(s.seq_id, seq, -1, -1)
        if mem.seq_pos_max(seq) != s.n_past - 1:
            self.holders.take_back(seq)
            return -1
        self.stats.n_in_holder += 1
        return seq

    def evict_one(self) -> bool:
        """KV is full (PromptCache.evict found no idle prefix): the request parked longest in a
        holder moves to host RAM, freeing its cells. False when none is."""
        with self.lock:
            held = [r.parked for r in self.queue if r.parked is not None and r.parked.seq >= 0]
        if not held:
            return False
        pk = min(held, key=lambda k: k.t_parked)
        data, ram = self.p.ctx.seq_state(pk.seq), self.p.cache.ram
        if ram is None or not ram.make_room(len(data)):
            self.stats.n_over_limit += 1  # past the limit rather than lose the request
            log.warning("KV cache full: a parked request's %d bytes go to host RAM past --cache-ram", len(data))
        pk.keep_bytes(data, ram)
        self.holders.take_back(pk.seq)
        pk.seq = -1
        self.stats.n_to_ram += 1
        log.info("KV cache full: a parked request's %d tokens moved to host RAM", pk.n_past)
        return True

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
            if pk.seq >= 0:  # from its holder: the cells are tagged back, nothing is copied
                mem.seq_cp(pk.seq, s.seq_id, -1, -1)
            else:
                p.ctx.set_seq_state(s.seq_id, pk.data)
            ok = mem.seq_pos_max(s.seq_id) == pk.n_past - 1
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
        s.phase = pk.phase
        s.req = r
        r.slot_id = s.id + slot_id_base
        pk.sampler = None
        pk.close()  # its holder sequence goes back
        r.parked = None
        self.stats.n_resumed += 1
        return True
