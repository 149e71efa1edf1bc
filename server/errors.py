"""Refusals: `ApiError` carries llama-server's error shape; every other server module raises it.

    {"error": {"code": 400, "message": "...", "type": "invalid_request_error"}}

A leaf module: it imports nothing from the server, so any layer may use it.
"""

from __future__ import annotations

RETRY_AFTER = "1"  # seconds, in the 503 answers of a busy or draining server

ERROR_STATUS = {
    "invalid_request_error": 400,
    "exceed_context_size_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "server_error": 500,
    "not_supported_error": 501,
    "unavailable_error": 503,
}


class ApiError(Exception):
    """An error answered as JSON: status code, llama-server error type, message, extra fields."""

    def __init__(self, status: int, type_: str, message: str, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.type, self.message, self.extra)


def error_body(status: int, type_: str, message: str, extra: dict | None = None) -> dict:
    err = {"code": status, "message": message, "type": type_}
    if extra:
        err.update(extra)
    return {"error": err}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


class ClientGone(Exception):
    """The client closed its connection while its request ran; the request was cancelled."""
