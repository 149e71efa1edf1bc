"""Which prompts get a step's prompt budget, and how many of them share one step.

A prompt token costs about the same at any batch width from ~128 tokens on (the default model
here: 529 tokens/s in pieces of 128, 515 in pieces of 512), so a step that takes four prompts of
125 tokens at once gives all four their first token after the four are done, where one prompt
a step gives them at 1/4, 2/4, 3/4 and 4/4 of that time: the same work, a mean time to first
token 0.62x as long. That is shortest-remaining-first, the order that minimises the mean wait,
applied step by step with two corrections:

- **Aging.** A prompt's place is when it would finish had it been served alone from its
  arrival (arrival + remaining tokens x seconds a token): a fresh short prompt goes before an
  old long one, but a long prompt that has waited longer than its own work takes its turn, so
  a stream of short prompts never starves it. A lower request priority still goes first.
- **Sharing a step.** Every step also costs its pass over the weights and the generating
  slots' rows, `overhead` tokens. Another prompt that would finish in this step joins it when
  the delay it adds to the k prompts already in (k x its tokens) is less than the step it
  saves itself and every prompt behind it (n_behind x overhead): prompts of a few tokens all
  go together, prompts of a hundred go one a step. Below a quarter of the budget the step's
  prompt tokens are not counted against it: small batches cost more a token (16 tokens took
  50 ms here, 128 took 242), and the budget (the ubatch size by default) is what a user sets
  larger where wide batches pay. A prompt that cannot finish within the budget takes the step
  only when it is the first in line, so it never delays a first token.

`budget` is the step's most prompt tokens (EngineConfig.prefill_chunk); without one (0: whole
prompts, as llama.cpp's parallel example) every prompt goes in whole, in slot order, as before.
"""

from __future__ import annotations

from typing import Sequence

from .seq_order import PASS_COST, SEQUENCE_COST
from .slot import PREFILL, Slot

SECONDS_PER_TOKEN = 2e-3  # a prompt token on the default model here, until measured
FIT_DECAY = 0.9           # weight of the older measurements (~10 prompt steps)
MIN_MEASURED = 32         # prompt tokens a step needs to be measured


class PrefillOrder:
    """The engine's choice of prompt pieces each step, and its running measure of what a
    prompt token costs (for aging)."""

    def __init__(self) -> None:
        self.seconds_per_token = SECONDS_PER_TOKEN

    def observe(self, n_prompt: int, n_rows: int, seconds: float) -> None:
        """A step decoded n_rows rows, n_prompt of them prompt tokens, in `seconds`."""
        if n_prompt >= MIN_MEASURED and n_rows > 0 and seconds > 0:
            self.seconds_per_token = (FIT_DECAY * self.seconds_per_token
                                      + (1 - FIT_DECAY) * seconds / n_rows)

    def pieces(self, slots: Sequence[Slot], budget: int, overhead: float) -> list[tuple[Slot, int]]:
        """(slot, tokens) for this step's prompt pieces, in the order to add them. `budget`:
        the most prompt tokens (0: no limit, whole prompts in slot order); `overhead`: what the
        step costs besides prompt tokens, in tokens."""
        todo = [(s, _left(s)) for s in slots if s.phase is PREFILL and _left(s) > 0]
        if not budget:
            return todo
        if len(todo) > 1:
            spt = self.seconds_per_token
            todo.sort(key=lambda t: (t[0].req.params.priority, t[0].req.timings.submitted + t[1] * spt))
        out: list[tuple[Slot, int]] = []
        finishing, floor, used = 0, budget // 4, 0
        for k, (s, left) in enumerate(todo):
            if budget <= 0:
                break
            n = min(left, budget)
            if n < left:  # a piece only: it delays every first token of the step, none comes sooner
                if out:
                    break
            elif finishing and used + n > floor and finishing * n > (len(todo) - k) * overhead:
                break  # it waits for the next step; so does everything behind it
            out.append((s, n))
            budget -= n
            used += n
            finishing += n == left
        return out


def _left(s: Slot) -> int:
    """Prompt tokens the slot still has to decode (up to a prefix-share hold)."""
    return (s.hold_at or len(s.req.prompt_tokens)) - s.prompt_pos


def step_overhead(n_rows: int, n_seqs: int) -> float:
    """What a step costs besides its prompt tokens, in tokens (seq_order's cost model): the
    pass over the weights and the rows already in the batch (generated tokens, drafts)."""
    return PASS_COST + SEQUENCE_COST * n_seqs + n_rows
