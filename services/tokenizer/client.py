"""A caller's side of DetokenizeStream, for whoever streams a model's tokens (the router): one object
per generated sequence over the caller's own channel, pure Python on the generated stubs.

    session = DetokenizeSession(stub, "smollm2", timeout=remaining)
    text = await session.send(new_ids)             # the text these ids completed ("" while one is cut)
    text = await session.send(last_ids, flush=True)  # at the end: whatever was held back
    await session.close()                          # always (a finally), also after an error
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.errors import Unavailable, error_for_code


async def ended(call, what: str) -> Unavailable:
    """The UNAVAILABLE for a stream that finished before we were done with it (its peer died or cut it:
    grpc.aio's write() then raises asyncio.InvalidStateError, which would otherwise be an INTERNAL)."""
    try:
        code, details = await call.code(), await call.details()
    except Exception:  # noqa: BLE001 - the status is only for the message
        code, details = None, ""
    return Unavailable(f"{what} ended early ({code.name if code else 'no status'}: {details})")


class DetokenizeSession:
    def __init__(
        self,
        stub: tokenizer_pb2_grpc.TokenizerStub,
        tokenizer: str,
        skip_special_tokens: bool = True,
        timeout: float | None = None,
    ):
        self._call = stub.DetokenizeStream(timeout=timeout, wait_for_ready=False)
        self._first: dict[str, Any] = {"tokenizer": tokenizer, "skip_special_tokens": skip_special_tokens}

    async def send(self, ids: Sequence[int], flush: bool = False) -> str:
        """The text `ids` complete. A refused request raises its ServiceError (the same status
        Detokenize would give); the sequence is as before it and the session can go on."""
        # The tokenizer goes along until a request succeeds: the service opens the sequence on the
        # first request it can serve, so after a refused first request the next must name it again.
        try:
            await self._call.write(tokenizer_pb2.DetokenizeStreamRequest(ids=ids, flush=flush, **self._first))
        except (
            asyncio.InvalidStateError
        ):  # the stream already ended (the service died): grpc says so, not with a status
            raise await ended(self._call, "the tokenizer service's DetokenizeStream") from None
        answer = await self._call.read()
        if answer is grpc.aio.EOF:
            raise Unavailable("the tokenizer service ended the DetokenizeStream")
        if answer.WhichOneof("result") == "error":
            raise error_for_code(answer.error.code, answer.error.message)
        self._first = {}
        return answer.text

    async def close(self) -> None:
        """Ends the stream with OK (or cancels it if it cannot end cleanly)."""
        if self._call.done():
            return
        try:
            await self._call.done_writing()
            await self._call.code()
        except BaseException:
            self._call.cancel()
            raise
