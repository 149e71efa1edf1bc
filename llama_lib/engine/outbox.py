"""What a step writes to its requests' streams, handed to the readers when the step ends.

Why: every ctypes call of a step (a row of logits per slot, KV edits at release) lets go of the
GIL. A reader woken by the first token of a step takes the GIL at the next such call and the
rest of the step waits while that reader formats and writes its chunk; eight streams made a
step's sampling three times slower in the server than in-process. Held until the step's end,
the chunks reach their readers just before the next llama_decode, which runs without the GIL,
so the readers' work overlaps the decode instead of lengthening the step.

Only the thread inside step() holds items; a write from anywhere else (close(), a request
failed between steps, a thread that never steps) goes straight to its reader.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator


class Outbox:
    """Items written during a step, in order, delivered by `step()`'s end."""

    def __init__(self) -> None:
        self._owner: int | None = None  # ident of the thread inside step(), None between steps
        self._held: list[tuple[Callable[[object], None], object]] = []

    def hold(self, deliver: Callable[[object], None], item: object) -> bool:
        """Keep `item` for `deliver` until the step ends; False (deliver it now) when the
        calling thread is not inside a step."""
        if self._owner != threading.get_ident():  # (None between steps: never a thread's)
            return False
        self._held.append((deliver, item))
        return True

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Hold what the calling thread writes until the block ends (even by an exception)."""
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self.flush()

    def flush(self) -> None:
        held, self._held = self._held, []
        for deliver, item in held:
            deliver(item)
