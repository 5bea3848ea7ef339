"""Request bytes that do not parse are the caller's error (INVALID_ARGUMENT), never UNKNOWN.

grpc answers a request deserializer that raises with UNKNOWN (unary) or INTERNAL ending the stream.
The shared interceptor therefore wraps every deserializer with tolerant(): a message that does not
parse (protobuf DecodeError, also for invalid UTF-8 in a string field) becomes an Undecodable
stand-in, and the call fails with its InvalidArgument - or, on a stream whose contract is to answer
each message (see per_message_errors), only that message's answer does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from services.shared.errors import InvalidArgument, bounded


class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument):
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # raw bytes handlers parse (and refuse) their requests themselves
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    what = message_type.full_name if message_type is not None else "request message"

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...: all bad bytes
            return Undecodable(
                InvalidArgument(bounded(f"the request is not a valid {what} ({len(data)} bytes do not parse: {exc})"))
            )

    return deserialize


def decoded(message):
    """`message`, or raises the InvalidArgument of a message whose bytes did not parse."""
    if isinstance(message, Undecodable):
        raise message.error
    return message


async def decoded_stream(messages: AsyncIterator) -> AsyncIterator:
    async for message in messages:
        yield decoded(message)


def per_message_errors(handler):
    """Marks a request-streaming handler that answers each message, errors included (TokenizeStream):
    it receives Undecodable messages as they are and calls decoded() on each itself."""
    handler.per_message_errors = True
    return handler
