"""The request side in one import, without HTTP: `from server import api`.

For programs and tests that parse request bodies directly; the server's own modules import
from where each name is defined (server.requests, server.chat, server.errors).
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
