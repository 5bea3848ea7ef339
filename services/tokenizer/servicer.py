"""Tokenizer gRPC servicer: protobuf ⇄ domain types only; the work is in dataplane.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.decoding import decoded, per_message_errors
from services.shared.errors import InvalidArgument, status_for
from services.shared.tensors import to_proto
from services.tokenizer.chat_template import Message
from services.tokenizer.dataplane import TokenizerDataplane
from services.tokenizer.generation import DecodeSession
from services.tokenizer.tokenization import Padding, TokenizedBatch, TokenizeOptions

_PADDING = {
    tokenizer_pb2.PADDING_UNSPECIFIED: Padding.LONGEST,
    tokenizer_pb2.PADDING_LONGEST: Padding.LONGEST,
    tokenizer_pb2.PADDING_FIXED: Padding.FIXED,
}


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, dataplane: TokenizerDataplane):
        self.dataplane = dataplane

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        return _fill(tokenizer_pb2.TokenizeResponse(), await self._tokenize(request))

    @per_message_errors  # a message that does not parse gets its INVALID_ARGUMENT answer; the stream goes on
    async def TokenizeStream(
        self, requests: AsyncIterator[tokenizer_pb2.TokenizeRequest], context: grpc.aio.ServicerContext
    ):
        # One request at a time, in arrival order: responses must come back in request order, and
        # running a stream's batches side by side would gain nothing, as every batch already queues
        # for tokenizers' one shared thread pool. Flow control holds back a caller that sends faster.
        # Async iteration measured as fast as context.read()/write(), and it is the handler shape the
        # shared interceptor wraps (an async generator).
        async for request in requests:
            yield await self._answer(request)

    async def _answer(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeStreamResponse:
        """One request's answer on a stream: its tensors, or the status Tokenize would have failed with."""
        answer = tokenizer_pb2.TokenizeStreamResponse()
        try:
            batch = await self._tokenize(request)
        except Exception as exc:  # noqa: BLE001 - every error is this request's status, never the stream's end
            _fill_error(answer.error, exc)
            return answer
        _fill(answer.response, batch)  # filled in place: no copy of the tensor bytes
        return answer

    async def _tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> TokenizedBatch:
        request = decoded(request)
        padding = _PADDING.get(request.padding)
        if padding is None:
            raise InvalidArgument(f"padding {request.padding} is not a known Padding value")
        options = TokenizeOptions(
            padding=padding,
            max_length=request.max_length,
            return_offsets=request.return_offsets,
            return_tokens=request.return_tokens,
        )
        return await self.dataplane.tokenize(request.tokenizer, list(request.texts), options, request.ByteSize())

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ChatTemplateRequest, context):
        messages = [Message(m.role, m.content) for m in request.messages]
        add_generation_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        name, prompt = await self.dataplane.apply_chat_template(request.tokenizer, messages, add_generation_prompt)
        return tokenizer_pb2.ChatTemplateResponse(prompt=prompt.prompt, input_ids=prompt.input_ids, tokenizer=name)

    async def Detokenize(self, request: tokenizer_pb2.DetokenizeRequest, context):
        text = await self.dataplane.detokenize(request.tokenizer, request.ids, _skip_special_tokens(request))
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def DetokenizeStream(self, requests: AsyncIterator[tokenizer_pb2.DetokenizeStreamRequest], context):
        # In arrival order, one answer each, like TokenizeStream. The first request opens the session;
        # if it names an unknown tokenizer, it and the next requests get NOT_FOUND errors until one
        # names a tokenizer that exists.
        session: DecodeSession | None = None
        async for request in requests:
            answer = tokenizer_pb2.DetokenizeStreamResponse()
            try:
                if session is None:
                    session = self.dataplane.decode_session(request.tokenizer, _skip_special_tokens(request))
                answer.text = session.step(request.ids, request.flush)
            except Exception as exc:  # noqa: BLE001 - every error is this request's status, never the stream's end
                _fill_error(answer.error, exc)
            yield answer

    async def GetTokenizer(self, request: tokenizer_pb2.GetTokenizerRequest, context):
        tokenizer = self.dataplane.catalog.get(request.tokenizer)
        current = request.if_none_match == tokenizer.digest
        return tokenizer_pb2.GetTokenizerResponse(
            tokenizer=tokenizer.name,
            digest=tokenizer.digest,
            tokenizer_json="" if current else tokenizer.definition,
            vocab_size=tokenizer.vocab_size,
        )

    async def ListTokenizers(self, request, context):
        return tokenizer_pb2.ListTokenizersResponse(
            tokenizers=[
                tokenizer_pb2.TokenizerInfo(
                    name=t.name,
                    max_length=t.default_max_length,
                    outputs=t.outputs,
                    vocab_size=t.vocab_size,
                    chat_template=t.chat_template is not None,
                    eos_token_id=t.eos_token_id,
                )
                for t in self.dataplane.tokenizers()
            ],
            default_tokenizer=self.dataplane.catalog.default,
        )


def _skip_special_tokens(request) -> bool:
    return request.skip_special_tokens if request.HasField("skip_special_tokens") else True


def _fill_error(error: tokenizer_pb2.StreamError, exc: Exception) -> None:
    """A stream request's failure as its answer; a bug is re-raised and ends the stream (the interceptor
    logs it and returns INTERNAL with an incident id)."""
    status = status_for(exc)
    if status is None:
        raise exc
    code, error.message = status
    error.code = code.value[0]


def _fill(response: tokenizer_pb2.TokenizeResponse, batch: TokenizedBatch) -> tokenizer_pb2.TokenizeResponse:
    """Writes `batch` into `response` (a new message, or the field of a stream's answer) and returns it."""
    response.tensors.extend(to_proto(name, array) for name, array in batch.tensors.items())
    response.tokenizer = batch.tokenizer
    for details in batch.items:
        item = response.items.add(
            length=details.length, truncated=details.truncated, original_length=details.original_length
        )
        if details.offsets is not None:
            item.offsets.extend(tokenizer_pb2.Offset(start=s, end=e) for s, e in details.offsets)
        if details.tokens is not None:
            item.tokens.extend(details.tokens)
    return response
