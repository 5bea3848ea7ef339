"""Domain errors and their gRPC status codes, mapped in this one place.

Domain modules raise these plain exceptions; the error interceptor turns them into statuses, so no
domain module needs to know about gRPC.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error a caller can act on; its message says what was wrong and where."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Sent with the status (e.g. a quota refusal's retry-after hint); empty for most errors.
    trailing_metadata: tuple[tuple[str, str], ...] = ()

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    """A configured limit was exceeded; the message names the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


# Trailing metadata key of a refusal's retry hint, in milliseconds (quota, load shedding); the OpenAI
# gateway turns it into HTTP Retry-After / retry-after-ms.
RETRY_AFTER_METADATA = "retry-after-ms"


# Status messages are sent as a header: one that echoes a large input could exceed the caller's metadata
# limit (gRPC's default is 8 KiB, and the message is percent-encoded: up to 3 bytes per byte), and the
# caller would see RESOURCE_EXHAUSTED instead of the error. Messages are cut to this many UTF-8 bytes.
MAX_STATUS_MESSAGE_BYTES = 1024


def bounded(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes (on a character boundary), saying how much was cut."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return message
    marker = f"… ({len(raw) - limit} more bytes cut)"
    kept = raw[: limit - len(marker.encode()) - 4].decode("utf-8", "ignore")  # 4: room for the count's digits
    return kept + f"… ({len(raw) - len(kept.encode())} more bytes cut)"


def item_error(kind: type[ServiceError], index: int, message: str) -> ServiceError:
    """An error about one batch item, named by its index so the caller can find it."""
    return kind(f"item {index}: {message}")


def limit_error(
    limit_name: str, limit: int | float, actual: int | float | str, index: int | None = None
) -> ResourceExhausted:
    """A configured limit was exceeded; names the limit, its value and (if any) the batch item."""
    where = f"item {index}: " if index is not None else ""
    return ResourceExhausted(f"{where}{limit_name} is {actual}, over the limit of {limit} ({limit_name} limit)")


# Peer statuses we forward as they are; anything else from a peer becomes UNAVAILABLE/INTERNAL.
_FORWARDED_PEER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a failed RPC returns for `exc`, or None for an unexpected (internal) error."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code in _FORWARDED_PEER_CODES:
            return code, exc.details() or code.name
        return grpc.StatusCode.UNAVAILABLE, f"peer failed with {code.name}: {exc.details()}"
    return None


def error_for_code(code: int, message: str) -> ServiceError:
    """The domain error for a status code sent as a number (a stream's per-request StreamError), so a
    caller re-raising it returns the same status; a code with no domain error here is INTERNAL."""
    for kind in (
        InvalidArgument,
        ResourceExhausted,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
    ):
        if kind.code.value[0] == code:
            return kind(message)
    return ServiceError(f"status {code}: {message}")
