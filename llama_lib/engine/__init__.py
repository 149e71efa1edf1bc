"""The continuous-batching engine (llama.cpp's parallel serving loop) as a package.

One job per module, each importing only those listed before it (tests/test_structure.py
checks there is no cycle, and that only this package and `pool` import `core`):

- `types`: configuration, request parameters, output chunks, timings, statistics, errors;
- `outbox`: a step's output, delivered to readers when the step ends;
- `handle`: what every handle has (id, timings, finish reason, error, wait, cancel);
- `request`: the handle of a generation request (its stream, result; asyncio reads);
- `callbacks`: on_chunk / on_done callbacks of a request, on callback threads;
- `output`: stop strings, whole UTF-8 characters, token probabilities;
- `slot`: a slot and its phase (idle / wait / prefill / generate), and how slots fill a batch;
- `prefix_tree`, `ram_cache`, `holders`: a radix tree of prompts, the host-RAM tier, holder
  sequences;
- `system_prompt`: the system prompt and its rules (the prefix a request wants, BOS), warm-up;
- `sequences`: the slots' KV sequences as the prompt cache sees them;
- `ram_tier`: sequences saved to and loaded from the host-RAM tier;
- `prefix_share`: prefixes copied between sequences, waits for a live prefill;
- `prompt_cache`: the prompt cache's narrow interface (choose, claim, cache_finished, evict);
- `parts`: the engine's parts that a step's phases take (`StepParts`);
- `lifecycle`: a request's start and end in a slot;
- `seq_order`, `decode`: the batch's layout, the decode phase (chunks, retries, sampling);
- `slot_files`: slots saved to and restored from files;
- `waiting`, `calls`: the queue of requests waiting for a slot; calls for the engine thread;
- `embedding`: the embedding lanes in a context of their own;
- `core`: `Engine`, its public API and `step()`;
- `pool`: `EnginePool`, several engines (contexts) over one model, and its dispatcher.

Everything public is re-exported here, so `from llama_lib.engine import Engine` keeps working.
"""

from ..batch import Batch
from ..context import DECODE_NO_KV_SLOT, Context, ContextParams
from ..model import Model
from ..sampler import Sampler, SamplingParams
from .core import Engine
from .output import StopMatcher, token_probs
from .pool import EnginePool, split_config
from .prompt_cache import PromptCache, common_prefix
from .handle import Handle
from .request import Request
from .slot import Slot, SlotPhase
from .system_prompt import starts_with_bos
from .types import (
    DEFAULT_PREFILL_CHUNK, PREFILL_WHOLE_PROMPT, Chunk, EngineClosed, EngineConfig, EngineStats, FinishReason, PromptTooLong, QueueFull,
    UserQueueFull,
    Progress, RequestParams, Timings, TokenProbs,
)

# The names these had when the engine was one module.
_StopMatcher = StopMatcher
_Slot = Slot
_common_prefix = common_prefix

__all__ = [
    "DEFAULT_PREFILL_CHUNK", "PREFILL_WHOLE_PROMPT", "Chunk", "Engine", "EngineClosed", "EnginePool", "EngineConfig", "EngineStats", "FinishReason",
    "PromptCache", "PromptTooLong", "QueueFull", "UserQueueFull", "Request", "RequestParams", "Slot", "SlotPhase",
    "StopMatcher", "Timings", "TokenProbs", "common_prefix", "split_config", "token_probs",
    "Handle", "Progress", "starts_with_bos",
    # imported by the single-module engine, still reachable as llama_lib.engine.X
    "Batch", "Context", "ContextParams", "DECODE_NO_KV_SLOT", "Model", "Sampler", "SamplingParams",
]
