"""Python client for the MaaS Mesh router.

    from maas.client import MeshClient
    with MeshClient("127.0.0.1:50051") as mesh:
        vectors = mesh.embed(["a sentence", "another"], model="minilm").vectors   # [2, 384] float32
        top = mesh.classify([open("cat.jpg", "rb").read()], model="efficientnet_lite0").results[0][0]
        out = mesh.infer("my_model", inputs={"x": np.zeros((1, 4), np.float32)}).outputs["y"]

Every call takes version= (a number) or alias= (e.g. "canary"), and routing_key= for sticky routing;
each result says which version answered (`.routed`). AsyncMeshClient has the same methods, awaitable.
Failures raise MeshError with the gRPC status code and the server's message.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.shared.tensors import from_proto, to_proto as to_tensor

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]

class MeshError(RuntimeError):
    """A failed call: `code` is the gRPC status (e.g. NOT_FOUND), the message is the server's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class Routed:
    """Which version answered and why (kind: explicit_version, alias, traffic_policy, default)."""

    model: str
    version: int
    kind: str
    target: str
    shadowed: bool


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # [texts, dimensions] float32
    truncated: list[bool]
    routed: Routed


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classifications:
    results: list[list[ClassScore]]  # per image, best first
    routed: Routed


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    routed: Routed


# -- request / response conversion (shared by both clients) ------------------------------------------
def model_ref(model: str, version: int | None, alias: str | None, routing_key: str | None) -> tensor_pb2.ModelRef:
    if version and alias:
        raise ValueError("give version or alias, not both")
    ref = tensor_pb2.ModelRef(name=model, routing_key=routing_key or "")
    if version:
        ref.version = int(version)
    elif alias:
        ref.alias = alias
    return ref


def _image_bytes(image: bytes | str | os.PathLike) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else Path(image).read_bytes()


def from_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    if tensor.datatype == "BYTES":
        items, raw, pos = [], tensor.raw_contents, 0
        while pos < len(raw):
            size = int.from_bytes(raw[pos:pos + 4], "little")
            items.append(raw[pos + 4:pos + 4 + size])
            pos += 4 + size
        return np.array(items, dtype=np.object_).reshape(tuple(tensor.shape))
    return from_proto(tensor)


def routed(decision: tensor_pb2.RoutingDecision) -> Routed:
    kind = tensor_pb2.RouteKind.Name(decision.kind).removeprefix("ROUTE_KIND_").lower()
    return Routed(decision.model, decision.version, kind, decision.target, decision.shadowed)


def embed_request(texts, model, version, alias, routing_key) -> router_pb2.EmbedRequest:
    if isinstance(texts, str):
        texts = [texts]
    return router_pb2.EmbedRequest(model=model_ref(model, version, alias, routing_key), texts=list(texts))


def embed_result(response: router_pb2.EmbedResponse) -> Embeddings:
    vectors = np.array([e.values for e in response.embeddings], np.float32).reshape(-1, response.dimensions)
    return Embeddings(vectors, list(response.truncated), routed(response.routed))


def classify_request(images, model, top_k, version, alias, routing_key) -> router_pb2.ClassifyRequest:
    if isinstance(images, (bytes, str, os.PathLike)):
        images = [images]
    return router_pb2.ClassifyRequest(model=model_ref(model, version, alias, routing_key),
                                      images=[_image_bytes(i) for i in images], top_k=top_k)


def classify_result(response: router_pb2.ClassifyResponse) -> Classifications:
    return Classifications([[ClassScore(c.index, c.label, c.score) for c in r.classes] for r in response.results],
                           routed(response.routed))


def infer_request(model, inputs, texts, images, outputs, version, alias, routing_key) -> router_pb2.InferRequest:
    return router_pb2.InferRequest(
        model=model_ref(model, version, alias, routing_key),
        inputs=[to_tensor(name, np.asarray(a)) for name, a in (inputs or {}).items()],
        texts=list(texts or ()), images=[_image_bytes(i) for i in images or ()], outputs=list(outputs or ()),
    )


def infer_result(response: router_pb2.InferResponse) -> InferResult:
    return InferResult({t.name: from_tensor(t) for t in response.outputs}, routed(response.routed))


# -- clients -----------------------------------------------------------------------------------------
class MeshClient:
    """Blocking client over one long-lived channel; thread-safe."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT):
        self.address, self.timeout = address, timeout
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise MeshError(exc.code(), exc.details()) from None

    def embed(self, texts: str | Sequence[str], model: str = "minilm", *, version: int | None = None,
              alias: str | None = None, routing_key: str | None = None, timeout: float | None = None) -> Embeddings:
        request = embed_request(texts, model, version, alias, routing_key)
        return embed_result(self._call(self._stub.Embed, request, timeout))

    def classify(self, images: Iterable[bytes | str | os.PathLike] | bytes, model: str = "efficientnet_lite0",
                 *, top_k: int = 0, version: int | None = None, alias: str | None = None,
                 routing_key: str | None = None, timeout: float | None = None) -> Classifications:
        request = classify_request(images, model, top_k, version, alias, routing_key)
        return classify_result(self._call(self._stub.Classify, request, timeout))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray] | None = None, *, texts: Sequence[str] = (),
              images: Sequence[bytes | str | os.PathLike] = (), outputs: Sequence[str] = (),
              version: int | None = None, alias: str | None = None, routing_key: str | None = None,
              timeout: float | None = None) -> InferResult:
        request = infer_request(model, inputs, texts, images, outputs, version, alias, routing_key)
        return infer_result(self._call(self._stub.Infer, request, timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MeshClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncMeshClient:
    """The same API for asyncio code (grpc.aio); create it inside the running event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT):
        self.address, self.timeout = address, timeout
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise MeshError(exc.code(), exc.details()) from None

    async def embed(self, texts, model: str = "minilm", *, version=None, alias=None, routing_key=None,
                    timeout=None) -> Embeddings:
        request = embed_request(texts, model, version, alias, routing_key)
        return embed_result(await self._call(self._stub.Embed, request, timeout))

    async def classify(self, images, model: str = "efficientnet_lite0", *, top_k: int = 0, version=None, alias=None,
                       routing_key=None, timeout=None) -> Classifications:
        request = classify_request(images, model, top_k, version, alias, routing_key)
        return classify_result(await self._call(self._stub.Classify, request, timeout))

    async def infer(self, model: str, inputs=None, *, texts=(), images=(), outputs=(), version=None, alias=None,
                    routing_key=None, timeout=None) -> InferResult:
        request = infer_request(model, inputs, texts, images, outputs, version, alias, routing_key)
        return infer_result(await self._call(self._stub.Infer, request, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncMeshClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
