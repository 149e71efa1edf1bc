"""The reasoning budget: a thinking block cut at N tokens, as llama.cpp's
common/reasoning-budget.cpp does it (a sampler stage placed before the chain).

State machine, over the tokens the request generates:
IDLE (waiting for the start tag) -> COUNTING (each token spends one of the budget; the end tag
ends it naturally) -> WAITING_UTF8 (the budget is spent but the last token ended inside a UTF-8
character) -> FORCING (the message, if any, then the end tag, one token per step, whatever the
logits say) -> DONE (passthrough; a new start tag arms it again).

Plain Python: it owns no C pointer. The `Sampler` asks `forced()` before it samples (a forced
token skips the chain) and feeds every token to `accept`. `ReasoningSwitch` is how another
thread (an HTTP handler's `POST /v1/chat/completions/control`) ends a running block: it only
sets a flag; the engine thread reads it at its next sample.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

IDLE, COUNTING, WAITING_UTF8, FORCING, DONE = "idle", "counting", "waiting_utf8", "forcing", "done"


class ReasoningSwitch:
    """A running request's "end the thinking now" flag, set from any thread (`request_end`),
    read by the engine thread (`take`). It also says whether its request is running: the
    sampler marks it live when the request gets a slot and finished when the slot lets go."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled  # the request asked for reasoning_control
        self._lock = threading.Lock()
        self._asked = False
        self._live = False
        self._finished = False
        self._handle = None

    def attach(self, handle) -> None:
        """The request's handle: once it is `done`, the request no longer counts as running
        (the slot keeps its sampler until its next request)."""
        self._handle = handle

    @property
    def live(self) -> bool:
        h = self._handle
        with self._lock:
            return self._live and not self._finished and not (h is not None and h.done)

    def mark_live(self) -> None:
        with self._lock:
            self._live = True

    def mark_finished(self) -> None:
        with self._lock:
            self._finished = True

    def request_end(self) -> bool:
        """Ask the engine to end the thinking block at its next token; False if the request is
        not running (queued, or over)."""
        if not self.live:
            return False
        with self._lock:
            self._asked = True
            return True

    def take(self) -> bool:
        """Was the end asked since the last call? (engine thread)"""
        with self._lock:
            asked, self._asked = self._asked, False
            return asked


@dataclass(frozen=True)
class ReasoningParams:
    """A request's thinking-block controls: the template's tags, the budget (-1 unlimited,
    0 closes the block at once), the message forced before the end tag, whether the prompt
    already opened the block, and the control switch (None: no runtime control)."""

    start: str
    end: str
    budget: int = -1
    message: str = ""
    opened: bool = False
    switch: ReasoningSwitch | None = None
    other_ends: tuple[str, ...] = ()  # more tags that end the block naturally (never forced)

    @property
    def needed(self) -> bool:
        """Does sampling need the budget stage? (not for an unlimited budget without control)"""
        return bool(self.start and self.end) and (self.budget >= 0 or (self.switch is not None and self.switch.enabled))


def _utf8_complete(piece: bytes) -> bool:
    """Does `piece` end on a character boundary? (common_utf8_is_complete)"""
    n = len(piece)
    for back in range(1, min(4, n) + 1):
        b = piece[n - back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): how long is its sequence?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return back >= need
    return True


class _Matcher:
    """Finds when the generated tokens end with one of some token sequences."""

    def __init__(self, *seqs: list[int]):
        self.seqs = [q for q in seqs if q]
        self.longest = max((len(q) for q in self.seqs), default=0)
        self.tail: list[int] = []

    def advance(self, tok: int) -> bool:
        if not self.seqs:
            return False
        self.tail.append(tok)
        if len(self.tail) > self.longest:
            del self.tail[0]
        if any(self.tail[-len(q):] == q for q in self.seqs):
            self.tail = []
            return True
        return False

    def reset(self) -> None:
        self.tail = []


class ReasoningBudget:
    """The budget stage of one request's sampler (engine thread only)."""

    def __init__(self, params: ReasoningParams, vocab):
        def toks(text: str) -> list[int]:
            return [int(t) for t in vocab.tokenize(text, add_special=False, parse_special=True)] if text else []

        self.params = params
        self._vocab = vocab
        self.budget = params.budget if params.budget >= 0 else 1 << 62
        self._start = _Matcher(toks(params.start))
        self._end = _Matcher(toks(params.end), *(toks(e) for e in params.other_ends))
        self.forced_tokens = toks(params.message) + toks(params.end)
        self.state = IDLE
        self.remaining = self.budget
        self._pos = 0
        if params.opened:
            self._open()

    def _open(self) -> None:
        self.state, self.remaining = COUNTING, self.budget
        self._end.reset()
        if self.remaining <= 0:
            self._force()

    def _force(self) -> None:
        self.state, self._pos = FORCING, 0
        self._end.reset()
        log.debug("reasoning budget: forcing the end of the thinking block")

    def forced(self) -> int | None:
        """The token this step must produce, or None to sample. Reads the control switch first."""
        sw = self.params.switch
        if sw is not None and sw.enabled and sw.take() and self.state == COUNTING:
            self._force()  # as common_reasoning_budget_force: only a counting block is ended
        if self.state == FORCING and self._pos < len(self.forced_tokens):
            return self.forced_tokens[self._pos]
        return None

    def accept(self, tok: int) -> None:
        """Feed the token just produced (sampled or forced)."""
        st = self.state
        if st in (IDLE, DONE):
            if self._start.advance(tok):
                self._open()
        elif st in (COUNTING, WAITING_UTF8):
            if self._end.advance(tok):
                self.state = DONE
                return
            complete = _utf8_complete(self._vocab.token_to_piece(tok, special=True))
            if st == WAITING_UTF8:
                if complete:
                    self._force()
            else:
                self.remaining -= 1
                if self.remaining <= 0:
                    if complete:
                        self._force()
                    else:
                        self.state = WAITING_UTF8
        elif st == FORCING:
            self._pos += 1
            if self._pos >= len(self.forced_tokens):
                self.state = DONE
