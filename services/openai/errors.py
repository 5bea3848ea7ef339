"""OpenAI-style error bodies and the gRPC status → HTTP status mapping, in this one place.

Body: {"error": {"message", "type", "param", "code"}} — what the official client reads into
`APIStatusError.body`. Codes the client retries by itself (408, 409, 429, 5xx) are only used where a
retry may succeed: FAILED_PRECONDITION (e.g. a version that is not READY) is 400, not 409.
"""

from __future__ import annotations

import math

import grpc

# The router's retry hint (trailing metadata, milliseconds) → HTTP Retry-After (whole seconds, rounded up)
# and retry-after-ms, which the official client prefers.
from services.shared.errors import RETRY_AFTER_METADATA

# gRPC status → (HTTP status, OpenAI error type)
_BY_GRPC: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_SERVER_ERROR = (500, "server_error")


class OpenAIError(Exception):
    """An error answered as an OpenAI error body; `param` names the request field when there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str) -> OpenAIError:
    """A 400 about one request field."""
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param)


def from_grpc(code: grpc.StatusCode, details: str, trailing_metadata=None) -> OpenAIError:
    """The router's status as an OpenAI error: same meaning, the router's message, the status name as `code`,
    its retry hint (quota, shedding) as Retry-After / retry-after-ms headers."""
    status, kind = _BY_GRPC.get(code, _SERVER_ERROR)
    param = "model" if code == grpc.StatusCode.NOT_FOUND and "model" in (details or "").lower() else None
    headers = {}
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_METADATA:
            try:
                ms = max(1, int(value))
            except (TypeError, ValueError):
                continue
            headers = {"Retry-After": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}
    return OpenAIError(status, details or code.name, type=kind, param=param, code=code.name.lower(), headers=headers)
