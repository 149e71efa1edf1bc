"""The parts of an engine that the phases of a step work on, without the engine itself.

`Engine` builds one `StepParts` and hands it to the decode phase (decode.py, seq_order.py);
a phase reads and edits these parts and returns what happened (the requests that ended) for
the engine to apply to its own state (its lock, its queue, its set of unfinished requests).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..batch import Batch
from ..context import Context, Memory
from ..model import Vocab
from .prompt_cache import PromptCache
from .slot import Slot
from .types import EngineConfig, EngineStats


@dataclass(frozen=True, slots=True)
class StepParts:
    ctx: Context
    memory: Memory
    batch: Batch
    slots: list[Slot]
    cache: PromptCache
    vocab: Vocab
    stats: EngineStats
    config: EngineConfig
    n_ctx_slot: int         # cells a slot's sequence may fill
    n_batch: int            # tokens per llama_decode call
    spec: object = None     # a speculative.Speculator when speculative decoding is on
