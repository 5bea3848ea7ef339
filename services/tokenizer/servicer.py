"""Tokenizer gRPC servicer: protobuf ⇄ domain types only; the work is in dataplane.py."""
from __future__ import annotations

import grpc

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.errors import InvalidArgument
from services.shared.tensors import to_proto
from services.tokenizer.dataplane import TokenizerDataplane
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
        padding = _PADDING.get(request.padding)
        if padding is None:
            raise InvalidArgument(f"padding {request.padding} is not a known Padding value")
        options = TokenizeOptions(
            padding=padding, max_length=request.max_length,
            return_offsets=request.return_offsets, return_tokens=request.return_tokens,
        )
        batch = await self.dataplane.tokenize(request.tokenizer, list(request.texts), options, request.ByteSize())
        return _response(batch)

    async def ListTokenizers(self, request, context):
        return tokenizer_pb2.ListTokenizersResponse(
            tokenizers=[
                tokenizer_pb2.TokenizerInfo(name=t.name, max_length=t.default_max_length, outputs=t.outputs,
                                            vocab_size=t.vocab_size)
                for t in self.dataplane.tokenizers()
            ],
            default_tokenizer=self.dataplane.catalog.default,
        )


def _response(batch: TokenizedBatch) -> tokenizer_pb2.TokenizeResponse:
    response = tokenizer_pb2.TokenizeResponse(
        tensors=[to_proto(name, array) for name, array in batch.tensors.items()], tokenizer=batch.tokenizer,
    )
    for details in batch.items:
        item = response.items.add(length=details.length, truncated=details.truncated,
                                  original_length=details.original_length)
        if details.offsets is not None:
            item.offsets.extend(tokenizer_pb2.Offset(start=s, end=e) for s, e in details.offsets)
        if details.tokens is not None:
            item.tokens.extend(details.tokens)
    return response

