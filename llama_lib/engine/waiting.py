"""The queue of submitted requests that wait for a slot, and the order they get one in.

Two schedules (EngineConfig.schedule; docs/scheduling.md):
- "fcfs": arrival order;
- "fair": the next request comes from the user who has had the fewest tokens decoded
  (prompt and generated: virtual-time fair queueing over tokens), arrival order within a user.
  A user who arrives with nothing waiting or running starts at the least-served active user's
  count, so service saved up while away buys no burst later ("recently").
Either way a lower `RequestParams.priority` goes first. With one user and priority 0 both are
first come first served, and the queue takes the plain FIFO path.

A parked request (preempt.py) waits here too, under its old id, so it goes before its user's
later requests. Other threads append (Engine.submit) and the engine thread takes, all under
the engine's lock, which the caller holds for every method here.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .request import Request
from .slot import Slot
from .types import QueueFull, UserQueueFull

SCHEDULES = ("fair", "fcfs")
MAX_USERS_KEPT = 1024  # idle users' counters past this many are forgotten (least recent first)


def user_of(r: Request) -> str:
    return r.params.user or ""


@dataclass
class UserStats:
    """One user's counters (Engine.users_info)."""

    vtime: float = 0.0       # tokens decoded for this user (the fair schedule's clock)
    n_waiting: int = 0       # requests in the queue (parked ones included)
    n_running: int = 0       # requests in slots
    n_admitted: int = 0      # times one of its requests got a slot (first start or resume)
    wait_s: float = 0.0      # seconds its requests waited for a slot before their first start
    n_started: int = 0       # first starts (wait_s is over these)
    n_preempted: int = 0     # its requests parked to give their slot to another
    n_refused: int = 0       # submits refused by max_queue_per_user
    t_active: float = 0.0    # last time it had anything queued or running


class WaitingQueue:
    def __init__(self, schedule: str = "fair", max_queue_per_user: int = -1) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        self.fair = schedule == "fair"
        self.max_queue_per_user = max_queue_per_user
        self._q: list[Request] = []          # in id (arrival) order
        self.users: dict[str, UserStats] = {}
        self._running: dict[Request, int] = {}  # taken requests -> tokens charged so far
        self._n_prio = 0                     # waiting requests with a priority other than 0

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)

    # -- arrivals -----------------------------------------------------------------------------

    def check_room(self, params, max_queue: int, all_busy: bool) -> None:
        """Raise QueueFull (UserQueueFull for one user over max_queue_per_user) when a request
        with these params may not wait now."""
        if not all_busy:
            return
        if len(self._q) >= max_queue:
            raise QueueFull(f"all slots are busy and {len(self._q)} requests wait")
        cap = self.max_queue_per_user
        if cap >= 0:
            user = params.user or ""
            u = self.users.get(user)
            if u is not None and u.n_waiting >= cap:
                u.n_refused += 1
                raise UserQueueFull(f"user {user!r} has {u.n_waiting} requests waiting (the limit per "
                                    f"user is {cap})", user, self._retry_after(u))

    @staticmethod
    def _retry_after(u: UserStats) -> int:
        """Seconds after which one of the user's waiting requests has likely started: its
        requests' mean wait so far, at least 1."""
        mean = u.wait_s / u.n_started if u.n_started else 1.0
        return max(1, math.ceil(mean))

    def append(self, r: Request) -> None:
        """A new request (or a parked one coming back), in id order."""
        user = user_of(r)
        u = self.users.get(user)
        if u is None:
            u = self.users[user] = UserStats()
            self._forget_idle_users()
        if self.fair and not u.n_waiting and not u.n_running:
            self.account()
            active = [v.vtime for v in self.users.values() if v.n_waiting or v.n_running]
            if active:
                u.vtime = max(u.vtime, min(active))
        u.n_waiting += 1
        u.t_active = time.perf_counter()
        if r.params.priority:
            self._n_prio += 1
        if not self._q or self._q[-1].id < r.id:
            self._q.append(r)
        else:
            self._q.insert(bisect.bisect(self._q, r.id, key=lambda q: q.id), r)

    def park(self, r: Request) -> None:
        """A running request whose KV was just parked (r.parked set) waits again."""
        self.account()
        self.users[user_of(r)].n_preempted += 1
        self.append(r)

    def _forget_idle_users(self) -> None:
        if len(self.users) <= MAX_USERS_KEPT:
            return
        idle = sorted((u.t_active, k) for k, u in self.users.items() if not u.n_waiting and not u.n_running)
        for _, k in idle[:len(self.users) - MAX_USERS_KEPT]:
            del self.users[k]

    # -- the order ----------------------------------------------------------------------------

    @property
    def simple(self) -> bool:
        """One user (or fcfs) and every priority 0: arrival order is the schedule."""
        return not self._n_prio and (not self.fair or len(self._waiting_users()) <= 1)

    def _waiting_users(self) -> set[str]:
        return {k for k, u in self.users.items() if u.n_waiting}

    def key(self, r: Request) -> tuple:
        """Who goes first: lower key. Priority, then (fair) the user's tokens and (on a tie, as
        for a user just arrived) its running requests, then arrival."""
        if not self.fair:
            return (r.params.priority, 0.0, 0, r.id)
        u = self.users[user_of(r)]
        return (r.params.priority, u.vtime, u.n_running, r.id)

    def best(self, skip: Callable[[Request], bool] | None = None) -> Request | None:
        """The request that would get the next free slot (not removed)."""
        if self.simple:
            return next((r for r in self._q if skip is None or not skip(r)), None)
        return min((r for r in self._q if skip is None or not skip(r)), key=self.key, default=None)

    def account(self) -> None:
        """Charge each user the tokens its running requests decoded since the last call; forget
        the requests that left their slot (ended or parked)."""
        for r, charged in list(self._running.items()):
            n = len(r.prompt_tokens) + len(r.tokens)
            u = self.users.get(user_of(r))
            if u is not None:
                u.vtime += n - charged
            if r.done or r.slot_id < 0 or r.parked is not None:
                del self._running[r]
                if u is not None:
                    u.n_running -= 1
                    u.t_active = time.perf_counter()
            else:
                self._running[r] = n

    def take(self, free: list[Slot], slots: list[Slot],
             choose: Callable[[Request, list[Slot]], Slot]) -> list[tuple[Slot, Request]]:
        """Pair waiting requests with free slots, reserving each slot, best first. A request
        that asked for a busy slot (RequestParams.slot) keeps its place in the queue."""
        self.account()
        chosen = []
        blocked: set[Request] = set()
        while self._q and free:
            r = self.best(lambda q: q in blocked) if blocked else self.best()
            if r is None:
                break
            want = r.params.slot
            if want is None:
                slot = choose(r, free)
            elif slots[want].req is None:
                slot = slots[want]
            else:
                blocked.add(r)
                continue
            self._remove(r)
            free.remove(slot)
            slot.req = r
            chosen.append((slot, r))
            self._started(r)
        return chosen

    def _started(self, r: Request) -> None:
        u = self.users[user_of(r)]
        u.n_running += 1
        u.n_admitted += 1
        if r.parked is None:  # a first start: its prompt is charged now, its tokens as they come
            u.n_started += 1
            u.wait_s += max(0.0, time.perf_counter() - r.timings.submitted)
        charged = len(r.prompt_tokens) + len(r.tokens)
        if r.parked is None:
            u.vtime += charged
        self._running[r] = charged

    def _remove(self, r: Request) -> None:
        self._q.remove(r)
        u = self.users.get(user_of(r))
        if u is not None:
            u.n_waiting -= 1
            u.t_active = time.perf_counter()
        if r.params.priority:
            self._n_prio -= 1

    def pop_cancelled(self) -> list[Request]:
        """Remove and return the requests cancelled while they waited (a parked one's KV
        state and sampler are freed)."""
        gone = [r for r in self._q if r._cancel.is_set()]
        for r in gone:
            self._remove(r)
            if r.parked is not None:
                r.parked.close()
                r.parked = None
        return gone

    # -- monitoring ---------------------------------------------------------------------------

    def users_info(self) -> list[dict]:
        """Per user: queue length, running, mean wait for a first start, preemptions, tokens."""
        now = time.perf_counter()
        out = []
        for k, u in self.users.items():
            waits = [now - r.timings.submitted for r in self._q if user_of(r) == k]
            out.append({
                "user": k, "n_waiting": u.n_waiting, "n_running": u.n_running,
                "n_parked": sum(1 for r in self._q if r.parked is not None and user_of(r) == k),
                "n_started": u.n_started, "wait_s_mean": u.wait_s / u.n_started if u.n_started else 0.0,
                "wait_s_oldest": max(waits, default=0.0), "n_preempted": u.n_preempted,
                "n_refused": u.n_refused, "vtime": int(u.vtime),
            })
        return out
