"""The queue of submitted requests that wait for a slot, first come first served.

Other threads append to it (Engine.submit) and the engine thread takes from it, all under the
engine's lock, which the caller holds for every method here.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator

from .request import Request
from .slot import Slot


class WaitingQueue:
    def __init__(self) -> None:
        self._q: collections.deque[Request] = collections.deque()

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)

    def append(self, r: Request) -> None:
        self._q.append(r)

    def take(self, free: list[Slot], slots: list[Slot],
             choose: Callable[[Request, list[Slot]], Slot]) -> list[tuple[Slot, Request]]:
        """Pair waiting requests with free slots, reserving each slot. A request that asked for
        a busy slot (RequestParams.slot) keeps its place in the queue."""
        chosen = []
        deferred: collections.deque[Request] = collections.deque()
        while self._q and free:
            r = self._q.popleft()
            want = r.params.slot
            if want is None:
                slot = choose(r, free)
            elif slots[want].req is None:
                slot = slots[want]
            else:
                deferred.append(r)
                continue
            free.remove(slot)
            slot.req = r
            chosen.append((slot, r))
        deferred.extend(self._q)
        self._q = deferred
        return chosen

    def pop_cancelled(self) -> list[Request]:
        """Remove and return the requests cancelled while they waited."""
        gone = [r for r in self._q if r._cancel.is_set()]
        if gone:
            self._q = collections.deque(r for r in self._q if not r._cancel.is_set())
        return gone
