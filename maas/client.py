"""Python client for the MaaS Mesh router.

    from maas.client import MeshClient
    with MeshClient("127.0.0.1:50051") as mesh:
        vectors = mesh.embed(["a sentence", "another"], model="minilm").vectors   # [2, 384] float32
        top = mesh.classify([open("cat.jpg", "rb").read()], model="efficientnet_lite0").results[0][0]
        out = mesh.infer("my_model", inputs={"x": np.zeros((1, 4), np.float32)}).outputs["y"]
        print(mesh.chat("Name a colour.", max_tokens=16).text)                   # unary: the whole answer
        for piece in mesh.chat([("system", "Be brief."), ("user", "Hi!")], stream=True):
            print(piece.text, end="", flush=True)                                  # streamed as generated

Every call takes version= (a number) or alias= (e.g. "canary"), and routing_key= for sticky routing;
each result says which version answered (`.routed`). AsyncMeshClient has the same methods, awaitable.
Failures raise MeshError with the gRPC status code and the server's message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import grpc
import numpy as np

from maas.auth import bearer
from maas.tls import ClientTls, open_channel
from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from maas import ports
from maas.tensors import from_proto, to_proto as to_tensor

DEFAULT_ADDRESS = ports.loopback(ports.ROUTER)
DEFAULT_TIMEOUT = 30.0
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]


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


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Generation:
    """A whole answer (unary generate/chat)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # stop, length or cancelled
    usage: Usage
    routed: Routed


@dataclass(frozen=True)
class GenerationPiece:
    """One streamed piece of the answer; the pieces concatenated are the unary text."""

    text: str
    token_ids: list[int]


@dataclass
class _StreamState:
    """What a stream learns as it goes: `routed` from the first message, the rest from the last."""

    routed: Routed | None = None
    finish_reason: str = ""
    usage: Usage | None = None
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def take(self, response: router_pb2.GenerateResponse) -> GenerationPiece | None:
        if response.HasField("routed") and self.routed is None:
            self.routed = routed(response.routed)
        if response.finish_reason:
            self.finish_reason = finish_reason(response.finish_reason)
        if response.HasField("usage"):
            self.usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens)
        if response.text or response.token_ids:
            self.pieces.append(response.text)
            return GenerationPiece(response.text, list(response.token_ids))
        return None


class GenerationStream(_StreamState):
    """Iterate for the pieces; afterwards `.text`, `.finish_reason`, `.usage` and `.routed` are set.
    Leaving a `with` block (or calling cancel()) early cancels the generation in the mesh."""

    def __init__(self, call):
        super().__init__()
        self._call = call

    def __iter__(self) -> Iterator[GenerationPiece]:
        try:
            for response in self._call:
                piece = self.take(response)
                if piece is not None:
                    yield piece
        except grpc.RpcError as exc:
            raise MeshError(exc.code(), exc.details()) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncGenerationStream(_StreamState):
    """The same for AsyncMeshClient: `async for piece in stream`."""

    def __init__(self, call):
        super().__init__()
        self._call = call

    async def __aiter__(self) -> AsyncIterator[GenerationPiece]:
        try:
            async for response in self._call:
                piece = self.take(response)
                if piece is not None:
                    yield piece
        except grpc.aio.AioRpcError as exc:
            raise MeshError(exc.code(), exc.details()) from None

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> "AsyncGenerationStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


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
            size = int.from_bytes(raw[pos : pos + 4], "little")
            items.append(raw[pos + 4 : pos + 4 + size])
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
    return router_pb2.ClassifyRequest(
        model=model_ref(model, version, alias, routing_key), images=[_image_bytes(i) for i in images], top_k=top_k
    )


def classify_result(response: router_pb2.ClassifyResponse) -> Classifications:
    return Classifications(
        [[ClassScore(c.index, c.label, c.score) for c in r.classes] for r in response.results], routed(response.routed)
    )


def infer_request(model, inputs, texts, images, outputs, version, alias, routing_key) -> router_pb2.InferRequest:
    return router_pb2.InferRequest(
        model=model_ref(model, version, alias, routing_key),
        inputs=[to_tensor(name, np.asarray(a)) for name, a in (inputs or {}).items()],
        texts=list(texts or ()),
        images=[_image_bytes(i) for i in images or ()],
        outputs=list(outputs or ()),
    )


def infer_result(response: router_pb2.InferResponse) -> InferResult:
    return InferResult({t.name: from_tensor(t) for t in response.outputs}, routed(response.routed))


def finish_reason(value: int) -> str:
    return router_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower() if value else ""


Messages = str | Sequence[tuple[str, str] | Mapping[str, str]]


def chat_messages(messages: Messages) -> router_pb2.ChatMessages:
    """A string is one user turn; else (role, content) pairs or {"role", "content"} dicts."""
    if isinstance(messages, str):
        messages = [("user", messages)]
    turns = [(m["role"], m["content"]) if isinstance(m, Mapping) else tuple(m) for m in messages]
    return router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role=r, content=c) for r, c in turns])


def generate_request(
    model: str,
    *,
    prompt: str | None = None,
    messages: Messages | None = None,
    max_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    repetition_penalty: float | None = None,
    version=None,
    alias=None,
    routing_key=None,
) -> router_pb2.GenerateRequest:
    sampling = router_pb2.SamplingParams(
        max_tokens=max_tokens, top_k=top_k, stop=[stop] if isinstance(stop, str) else list(stop)
    )
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
        ("repetition_penalty", repetition_penalty),
    ):
        if value is not None:
            setattr(sampling, name, value)
    request = router_pb2.GenerateRequest(model=model_ref(model, version, alias, routing_key), sampling=sampling)
    if messages is not None:
        request.messages.CopyFrom(chat_messages(messages))
    else:
        request.prompt = prompt or ""
    return request


def generation_result(response: router_pb2.GenerateResponse) -> Generation:
    return Generation(
        response.text,
        list(response.token_ids),
        finish_reason(response.finish_reason),
        Usage(response.usage.prompt_tokens, response.usage.completion_tokens),
        routed(response.routed),
    )


# -- clients -----------------------------------------------------------------------------------------
API_KEY_ENV = "MAAS_API_KEY"


def _key_metadata(api_key: str | None) -> tuple:
    """`authorization: Bearer <key>` for a router with auth on (docs/security.md); default $MAAS_API_KEY."""
    return bearer(api_key if api_key is not None else os.environ.get(API_KEY_ENV, ""))


class MeshClient:
    """Blocking client over one long-lived channel; thread-safe. `tls`: ClientTls (root cert, client
    cert/key), None = from MAAS_TLS_* in the environment (maas/tls.py), False = plaintext. `api_key`
    (default $MAAS_API_KEY): the tenant's key, sent with every call."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = DEFAULT_TIMEOUT,
        tls: ClientTls | bool | None = None,
        api_key: str | None = None,
    ):
        self.address, self.timeout = address, timeout
        self._channel = open_channel(address, _CHANNEL_OPTIONS, tls)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = _key_metadata(api_key)

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise MeshError(exc.code(), exc.details()) from None

    def embed(
        self,
        texts: str | Sequence[str],
        model: str = "minilm",
        *,
        version: int | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
        timeout: float | None = None,
    ) -> Embeddings:
        request = embed_request(texts, model, version, alias, routing_key)
        return embed_result(self._call(self._stub.Embed, request, timeout))

    def classify(
        self,
        images: Iterable[bytes | str | os.PathLike] | bytes,
        model: str = "efficientnet_lite0",
        *,
        top_k: int = 0,
        version: int | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
        timeout: float | None = None,
    ) -> Classifications:
        request = classify_request(images, model, top_k, version, alias, routing_key)
        return classify_result(self._call(self._stub.Classify, request, timeout))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        texts: Sequence[str] = (),
        images: Sequence[bytes | str | os.PathLike] = (),
        outputs: Sequence[str] = (),
        version: int | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        request = infer_request(model, inputs, texts, images, outputs, version, alias, routing_key)
        return infer_result(self._call(self._stub.Infer, request, timeout))

    @overload
    def generate(
        self, prompt: str, model: str = ..., *, stream: Literal[False] = ..., timeout: float | None = ..., **sampling
    ) -> Generation: ...
    @overload
    def generate(
        self, prompt: str, model: str = ..., *, stream: Literal[True], timeout: float | None = ..., **sampling
    ) -> GenerationStream: ...
    def generate(
        self, prompt: str, model: str = "smollm2", *, stream: bool = False, timeout: float | None = None, **sampling
    ) -> Generation | GenerationStream:
        """Raw prompt (no chat template). Sampling: max_tokens, temperature, top_p, top_k, seed, stop,
        repetition_penalty; routing: version, alias, routing_key. stream=True → a GenerationStream."""
        return self._generate(generate_request(model, prompt=prompt, **sampling), stream, timeout)

    @overload
    def chat(
        self,
        messages: Messages,
        model: str = ...,
        *,
        stream: Literal[False] = ...,
        timeout: float | None = ...,
        **sampling,
    ) -> Generation: ...
    @overload
    def chat(
        self, messages: Messages, model: str = ..., *, stream: Literal[True], timeout: float | None = ..., **sampling
    ) -> GenerationStream: ...
    def chat(
        self,
        messages: Messages,
        model: str = "smollm2",
        *,
        stream: bool = False,
        timeout: float | None = None,
        **sampling,
    ) -> Generation | GenerationStream:
        """Chat turns through the model's chat template; the same options as generate()."""
        return self._generate(generate_request(model, messages=messages, **sampling), stream, timeout)

    def _generate(self, request, stream: bool, timeout):
        if stream:
            return GenerationStream(
                self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
            )
        return generation_result(self._call(self._stub.GenerateUnary, request, timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MeshClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncMeshClient:
    """The same API for asyncio code (grpc.aio); create it inside the running event loop."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = DEFAULT_TIMEOUT,
        tls: ClientTls | bool | None = None,
        api_key: str | None = None,
    ):
        self.address, self.timeout = address, timeout
        self._channel = open_channel(address, _CHANNEL_OPTIONS, tls, aio=True)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = _key_metadata(api_key)

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise MeshError(exc.code(), exc.details()) from None

    async def embed(
        self, texts, model: str = "minilm", *, version=None, alias=None, routing_key=None, timeout=None
    ) -> Embeddings:
        request = embed_request(texts, model, version, alias, routing_key)
        return embed_result(await self._call(self._stub.Embed, request, timeout))

    async def classify(
        self,
        images,
        model: str = "efficientnet_lite0",
        *,
        top_k: int = 0,
        version=None,
        alias=None,
        routing_key=None,
        timeout=None,
    ) -> Classifications:
        request = classify_request(images, model, top_k, version, alias, routing_key)
        return classify_result(await self._call(self._stub.Classify, request, timeout))

    async def infer(
        self,
        model: str,
        inputs=None,
        *,
        texts=(),
        images=(),
        outputs=(),
        version=None,
        alias=None,
        routing_key=None,
        timeout=None,
    ) -> InferResult:
        request = infer_request(model, inputs, texts, images, outputs, version, alias, routing_key)
        return infer_result(await self._call(self._stub.Infer, request, timeout))

    async def generate(
        self, prompt: str, model: str = "smollm2", *, stream: bool = False, timeout=None, **sampling
    ) -> Generation | AsyncGenerationStream:
        """As MeshClient.generate; with stream=True: `async for piece in await mesh.generate(..., stream=True)`."""
        return await self._generate(generate_request(model, prompt=prompt, **sampling), stream, timeout)

    async def chat(
        self, messages: Messages, model: str = "smollm2", *, stream: bool = False, timeout=None, **sampling
    ) -> Generation | AsyncGenerationStream:
        return await self._generate(generate_request(model, messages=messages, **sampling), stream, timeout)

    async def _generate(self, request, stream: bool, timeout):
        if stream:
            return AsyncGenerationStream(
                self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
            )
        return generation_result(await self._call(self._stub.GenerateUnary, request, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncMeshClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
