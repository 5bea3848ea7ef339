"""Clients for the router's peers: tokenizer, vision and Triton, each over one long-lived channel.

Every call gets the caller's remaining deadline and wait_for_ready=False, so a peer that is down
fails fast with UNAVAILABLE instead of hanging; cancelling the caller cancels the awaited call.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas.v1 import tensor_pb2, tokenizer_pb2, tokenizer_pb2_grpc, vision_pb2, vision_pb2_grpc
from services.shared.errors import Unavailable

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def names_peer(method):
    """An unreachable peer becomes UNAVAILABLE saying which peer, so callers and operators know where to look."""
    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"{self.peer} is unavailable: {exc.details()}") from None
            raise
    return call


@dataclass(frozen=True)
class Tokenized:
    tensors: list[tensor_pb2.Tensor]
    truncated: list[bool]


class TokenizerPeer:
    def __init__(self, channel: grpc.aio.Channel, address: str = ""):
        self._stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self.peer = f"the tokenizer service ({address})"

    @names_peer
    async def tokenize(self, tokenizer: str, texts: list[str], timeout: float | None) -> Tokenized:
        request = tokenizer_pb2.TokenizeRequest(tokenizer=tokenizer, texts=texts,
                                                padding=tokenizer_pb2.PADDING_LONGEST)
        response = await self._stub.Tokenize(request, timeout=timeout, wait_for_ready=False)
        return Tokenized(list(response.tensors), [item.truncated for item in response.items])


class VisionPeer:
    def __init__(self, channel: grpc.aio.Channel, address: str = ""):
        self._stub = vision_pb2_grpc.VisionStub(channel)
        self.peer = f"the vision service ({address})"

    @names_peer
    async def preprocess(self, spec: str, images: list[bytes], output_name: str,
                         timeout: float | None) -> tensor_pb2.Tensor:
        request = vision_pb2.PreprocessRequest(spec=spec, images=images, output_name=output_name)
        response = await self._stub.Preprocess(request, timeout=timeout, wait_for_ready=False)
        return response.tensor


class TritonPeer:
    """Triton's own gRPC API through the raw generated stub (no tritonclient per-call overhead)."""

    def __init__(self, channel: grpc.aio.Channel, address: str = ""):
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.peer = f"Triton ({address})"
        # Bytes in, bytes out: the passthrough never parses or re-serialises tensors.
        self._raw_infer = channel.unary_unary(MODEL_INFER_METHOD)
        self._max_batch: dict[tuple[str, str], int] = {}  # versions are immutable: cache forever

    @names_peer
    async def max_batch_size(self, model: str, version: str, timeout: float | None) -> int:
        """The version's max_batch_size from Triton's config (0 = no batch dimension), fetched once."""
        key = (model, version)
        if key not in self._max_batch:
            request = service_pb2.ModelConfigRequest(name=model, version=version)
            response = await self.stub.ModelConfig(request, timeout=timeout, wait_for_ready=False)
            self._max_batch[key] = int(response.config.max_batch_size)
        return self._max_batch[key]

    @names_peer
    async def infer(self, model: str, version: str, inputs: list[tensor_pb2.Tensor], outputs: list[str],
                    timeout: float | None) -> list[tensor_pb2.Tensor]:
        request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        for tensor in inputs:
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(tensor.raw_contents)
        for name in outputs:
            request.outputs.add(name=name)
        response = await self.stub.ModelInfer(request, timeout=timeout, wait_for_ready=False)
        return [
            tensor_pb2.Tensor(name=o.name, datatype=o.datatype, shape=o.shape, raw_contents=raw)
            for o, raw in zip(response.outputs, response.raw_output_contents)
        ]

    @names_peer
    async def infer_raw(self, request: bytes, timeout: float | None) -> bytes:
        return await self._raw_infer(request, timeout=timeout, wait_for_ready=False)

    @names_peer
    async def call(self, method: str, request, timeout: float | None):
        """Any other unary method of Triton's API by name, e.g. call("ModelMetadata", req, 5)."""
        return await getattr(self.stub, method)(request, timeout=timeout, wait_for_ready=False)


def output_tensor(response: service_pb2.ModelInferResponse, name: str) -> tensor_pb2.Tensor | None:
    """One output of a (parsed) ModelInferResponse as a maas Tensor; None when absent."""
    for i, out in enumerate(response.outputs):
        if (not name or out.name == name) and i < len(response.raw_output_contents):
            return tensor_pb2.Tensor(name=out.name, datatype=out.datatype, shape=out.shape,
                                     raw_contents=response.raw_output_contents[i])
    return None
