"""The continuous-batching engine (llama.cpp's parallel serving loop) as a package.

One job per module, each importing only those listed before it:

- `types`: configuration, request parameters, output chunks, timings, statistics, errors;
- `request`: the handle of a submitted request (its stream, result, cancellation; asyncio reads);
- `callbacks`: on_chunk / on_done callbacks of a request, on callback threads;
- `output`: stop strings, whole UTF-8 characters, token probabilities;
- `slot`: a slot and its phase (idle / prefill / generate), and how slots fill a batch;
- `prompt_cache`: slot choice, prompt reuse, what a finished request leaves, eviction;
- `waiting`: the queue of requests waiting for a slot;
- `system_prompt`: the shared system prompt in sequence 0, the warm-up decode;
- `calls`: functions other threads hand to the engine thread;
- `embedding`: the embedding lanes in a context of their own;
- `decode`: the decode phase of a step (chunks, the halving retry, sampling);
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
from .request import Request
from .slot import Slot, SlotPhase
from .types import (
    DEFAULT_PREFILL_CHUNK, PREFILL_WHOLE_PROMPT, Chunk, EngineClosed, EngineConfig, EngineStats, FinishReason, PromptTooLong, QueueFull,
    RequestParams, Timings, TokenProbs,
)

# The names these had when the engine was one module.
_StopMatcher = StopMatcher
_Slot = Slot
_common_prefix = common_prefix

__all__ = [
    "DEFAULT_PREFILL_CHUNK", "PREFILL_WHOLE_PROMPT", "Chunk", "Engine", "EngineClosed", "EnginePool", "EngineConfig", "EngineStats", "FinishReason",
    "PromptCache", "PromptTooLong", "QueueFull", "Request", "RequestParams", "Slot", "SlotPhase",
    "StopMatcher", "Timings", "TokenProbs", "common_prefix", "split_config", "token_probs",
    # imported by the single-module engine, still reachable as llama_lib.engine.X
    "Batch", "Context", "ContextParams", "DECODE_NO_KV_SLOT", "Model", "Sampler", "SamplingParams",
]
