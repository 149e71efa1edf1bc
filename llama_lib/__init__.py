"""Python bindings to libllama (llama.cpp v0.5.0) and a continuous-batching engine on top."""

from .loader import (
    DEFAULT_MODEL,
    BuildInfo,
    LlamaLibraryError,
    build_info,
    default_model_path,
    llama_build_info,
    load_library,
    system_info,
)
from .model import Model, ModelLoadError, Vocab, apply_chat_template, builtin_chat_templates
from .context import Context, ContextError, ContextParams, DecodeError, Memory
from .batch import Batch
from .sampler import Sampler, SamplingParams

__all__ = [
    "Batch", "BuildInfo", "Context", "ContextError", "ContextParams", "DEFAULT_MODEL", "DecodeError",
    "LlamaLibraryError", "Memory", "Model", "ModelLoadError", "Sampler", "SamplingParams",
    "Vocab", "apply_chat_template", "build_info", "builtin_chat_templates", "default_model_path",
    "llama_build_info", "load_library", "system_info",
]

from .engine import (  # noqa: E402
    Chunk, Engine, EngineClosed, EngineConfig, EnginePool, EngineStats, FinishReason, PromptTooLong,
    Progress, QueueFull, Request, RequestParams, Timings, UserQueueFull,
)

__all__ += [
    "Chunk", "Engine", "EngineClosed", "EngineConfig", "EnginePool", "EngineStats", "FinishReason",
    "Progress", "PromptTooLong", "QueueFull", "Request", "RequestParams", "Timings", "UserQueueFull",
]
