"""The API side: request bodies to an immutable `Job` (job, requests, structured), the wire
formats (shapes/: one class per format), a job's stream (stream), several choices (fanout),
embeddings (embeddings). No socket and no Service here: what they need is handed down.

This module is also the request side in one import, without HTTP, for programs and tests
(`from server import api`); the server's own modules import from where each name is defined.
"""

from ..chat.render import FALLBACK_TEMPLATE, render_chat
from ..errors import ApiError, bad_request, error_body
from .job import KIND_COMPLETION, KIND_OAI_CHAT, KIND_OAI_COMPLETION, Defaults, Job
from .requests import (
    N_PREDICT_MAX, base_params, parse_chat, parse_completion, parse_detokenize, parse_job,
    parse_tokenize, sampling_params,
)

# the names request parsing had when it all lived in this module
_base_params = base_params
_sampling = sampling_params

__all__ = [
    "ApiError", "Defaults", "FALLBACK_TEMPLATE", "Job", "KIND_COMPLETION", "KIND_OAI_CHAT",
    "KIND_OAI_COMPLETION", "N_PREDICT_MAX", "bad_request", "base_params", "error_body",
    "parse_chat", "parse_completion", "parse_detokenize", "parse_job", "parse_tokenize", "render_chat",
    "sampling_params",
]
