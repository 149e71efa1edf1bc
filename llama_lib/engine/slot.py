"""A slot: one of the engine's n_parallel places a request runs in, with its KV sequence, and
what slots put in a step's batch.

A slot is in one of four phases: idle (no request; its sequence may hold a prompt cache),
wait (its request waits for another slot to decode the prefix they share, prefix_share.py),
prefill (a request's prompt is going into the batch, piece by piece) and generate (its
last sampled token goes into the next batch).
"""

from __future__ import annotations

import enum

import numpy as np

from ..batch import Batch
from ..sampler import Sampler
from .output import StopMatcher
from .request import Request


class SlotPhase(enum.Enum):
    IDLE = "idle"          # no request
    WAIT = "wait"          # the request waits for `follow` to decode a shared prefix
    PREFILL = "prefill"    # the prompt is not all decoded and sampled from yet
    GENERATE = "generate"  # `sampled` is the token to decode next


IDLE, WAIT, PREFILL, GENERATE = SlotPhase.IDLE, SlotPhase.WAIT, SlotPhase.PREFILL, SlotPhase.GENERATE


class Slot:
    """A slot's state; it decodes in KV sequence id + 1 (sequence 0 is the system prompt's)."""

    __slots__ = ("id", "seq_id", "phase", "req", "sampler", "matcher", "n_past", "n_prefix",
                 "prefix_version", "prompt_pos", "i_batch", "sampled", "t_last",
                 "kv_pos_max", "cache_tokens", "follow", "follow_req", "follow_n", "hold_at",
                 "cache_hit", "shift_keep", "n_shifted")

    def __init__(self, sid: int):
        self.id = sid
        self.seq_id = sid + 1
        self.phase = IDLE
        self.req: Request | None = None
        self.sampler: Sampler | None = None
        self.matcher: StopMatcher | None = None
        self.n_past = 0          # next position to write in the sequence
        self.n_prefix = 0        # system prompt tokens this sequence holds
        self.prefix_version = 0  # which system prompt those tokens are
        self.prompt_pos = 0      # prompt tokens of the request already in the batch
        self.i_batch = -1        # row of this slot's logits in the current batch, -1 if none
        self.sampled = -1        # last sampled token, decoded in the next step
        self.t_last = 0.0        # when the slot was last released (for evicting its cache)
        # While idle: the tokens the sequence holds after the system prompt (the last request's
        # prompt and generated tokens), reusable by the next request. Empty while busy.
        self.cache_tokens = np.zeros(0, np.int32)
        self.kv_pos_max = -1     # seq_pos_max of the sequence, read by the engine thread when
                                 # the slot was last released or reset (for monitoring)
        # WAIT: the slot whose request (follow_req) is decoding the first follow_n prompt
        # tokens this request shares; hold_at: prompt tokens this slot's prefill stops at for
        # now, so that slots waiting for it copy exactly there (0: no stop)
        self.follow: Slot | None = None
        self.follow_req: Request | None = None
        self.follow_n = 0
        self.hold_at = 0
        # the current (or last) request's cached prompt tokens: which tier ("own": the slot's
        # cache, "shared": another KV sequence's, "ram": the host-RAM tier; "" none) and how many
        self.cache_hit: tuple[str, int] = ("", 0)
        # context shift (ctx_shift.py): the request's tokens the sequence keeps at its start
        # (after the system prefix) and how many after those it dropped, all shifts together
        self.shift_keep = 0
        self.n_shifted = 0

    @property
    def busy(self) -> bool:
        return self.req is not None

    @property
    def generating(self) -> bool:
        return self.phase is GENERATE

    def info(self, n_ctx: int) -> dict:
        """A snapshot for monitoring (Engine.slots_info), safe to read from any thread."""
        r = self.req
        return {
            "id": self.id,
            "seq_id": self.seq_id,
            "n_ctx": n_ctx,
            "is_processing": r is not None,
            "id_task": r.id if r is not None else -1,
            "n_past": self.n_past,
            "n_prompt_tokens": r.n_prompt_tokens if r is not None else 0,
            "n_decoded": len(r.tokens) if r is not None else 0,
            "n_system_tokens": self.n_prefix,
            # the sequence's largest KV position when the slot was last released (-1: empty)
            "kv_pos_max": self.kv_pos_max,
            "prompt_cache": {"tier": self.cache_hit[0], "n_tokens": self.cache_hit[1]},
            "user": (r.params.user or "") if r is not None else None,
            "priority": r.params.priority if r is not None else 0,
        }

    def begin(self, req: Request, n_past: int, n_cached: int, sampler: Sampler,
              matcher: StopMatcher) -> None:
        """Start prefilling `req`, whose first n_cached prompt tokens the sequence holds."""
        if self.sampler is not None:
            self.sampler.close()
        self.req = req
        self.phase = PREFILL
        self.n_past = n_past
        self.prompt_pos = n_cached
        self.i_batch = -1
        self.sampled = -1
        self.sampler = sampler
        self.matcher = matcher
        self.shift_keep = self.n_shifted = 0
        if req.params.return_progress:  # the first report: nothing decoded yet
            req._progress(n_cached)

    def wait_for(self, req: Request, leader: "Slot", n_shared: int) -> None:
        """Hold `req` until `leader` has decoded the first n_shared prompt tokens."""
        self.req = req
        self.phase = WAIT
        self.follow, self.follow_req, self.follow_n = leader, leader.req, n_shared

    def end(self, now: float) -> Request | None:
        """Forget the request (returned); the sequence is left as it is."""
        req, self.req = self.req, None
        self.phase = IDLE
        self.follow = self.follow_req = None
        self.hold_at = 0
        self.matcher = None
        self.sampled = -1
        self.i_batch = -1
        self.t_last = now
        return req


def kept_tokens(s: Slot, tokens: np.ndarray) -> np.ndarray:
    """The request's prompt-and-generated `tokens` as the slot's sequence holds them after
    its context shifts (ctx_shift.py): one run dropped after the first shift_keep."""
    if not s.n_shifted:
        return tokens
    k = s.shift_keep
    return np.concatenate([tokens[:k], tokens[k + s.n_shifted:]]).astype(np.int32)


def repoint_rows(slots: list[Slot], new_index, start: int = 0) -> None:
    """After the batch's rows moved (Batch.remove_sequence / permute): each slot's logits row
    from `start` on follows its token to its new index."""
    for s in slots:
        if s.i_batch >= start:
            s.i_batch = int(new_index[s.i_batch])


def batch_generated(slots: list[Slot], batch: Batch) -> None:
    """Add the token each generating slot sampled last step, one vectorised write."""
    gen = [s for s in slots if s.phase is GENERATE]
    if not gen:
        return
    start = batch.add_tokens(
        np.fromiter((s.sampled for s in gen), np.int32, len(gen)),
        np.fromiter((s.n_past for s in gen), np.int32, len(gen)),
        np.fromiter((s.seq_id for s in gen), np.int32, len(gen)),
    )
    for k, s in enumerate(gen):
        s.i_batch = start + k
        s.n_past += 1


def batch_prompts(pieces: list[tuple[Slot, int]], batch: Batch) -> int:
    """Add the step's prompt pieces (slot, tokens; prefill_order.py chose them). Returns how
    many tokens were added; a slot whose last prompt token is in gets its logits row (i_batch)."""
    added = 0
    for s, n in pieces:
        r = s.req
        n = min(n, batch.capacity - batch.n_tokens)
        if n <= 0:
            continue
        last = s.prompt_pos + n == len(r.prompt_tokens)
        i = batch.add_sequence(r.prompt_tokens[s.prompt_pos:s.prompt_pos + n], s.n_past,
                               s.seq_id, logits_last=last)
        s.prompt_pos += n
        s.n_past += n
        added += n
        s.i_batch = i if last else -1
    return added
