"""The data plane: route a request to a version, run that version's pipeline, post-process.

The pipeline (which preprocessing service, which postprocessing) is read from the version's registry
metadata, so a newly registered model needs no change here. No gRPC server types in this module:
the servicer hands in plain values and a timeout, and gets plain values back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from maas.v1 import tensor_pb2

from services.router import signature, wire
from services.router.admission import charge
from services.router.metrics import ROUTER_INFLIGHT, ROUTER_REQUESTS
from services.router.peers import TokenizerPeer, TritonPeer, VisionPeer, output_tensor
from services.router.postprocess import ClassScore, as_matrix, l2_normalise, softmax, top_k
from services.router.routing import PostKind, PreKind, Route, RoutingTable, VersionInfo
from services.router.shadow import ShadowRunner
from services.router.version_stats import VersionStatsReporter, counted, note_routed
from services.shared.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, limit_error
from services.shared.telemetry import annotate
from services.shared.tensors import from_proto, to_proto

DEFAULT_TOP_K = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int = 0
    alias: str = ""
    routing_key: str = ""


@dataclass(frozen=True)
class Payload:
    """What a caller sends: tensors, or texts / images for the version's preprocessing."""

    tensors: list[tensor_pb2.Tensor] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # [batch, dimensions] float32
    truncated: list[bool]
    route: Route


@dataclass(frozen=True)
class ClassifyResult:
    classes: list[list[ClassScore]]
    route: Route


@dataclass(frozen=True)
class InferResult:
    outputs: list[tensor_pb2.Tensor]
    route: Route


class Deadline:
    """The caller's deadline (or the router's default), handed on to every downstream call."""

    def __init__(self, timeout: float | None):
        self.at = time.monotonic() + timeout if timeout is not None else None

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the router could call its peers")
        return left


@dataclass(frozen=True)
class Prepared:
    tensors: list[tensor_pb2.Tensor]
    truncated: list[bool]


def _inflight(method):
    """Counts the request in maas_router_inflight_requests (what the HPA scales on) while it runs."""

    @functools.wraps(method)
    async def tracked(*args, **kwargs):
        ROUTER_INFLIGHT.inc()
        try:
            return await method(*args, **kwargs)
        finally:
            ROUTER_INFLIGHT.dec()

    return tracked


class Dataplane:
    def __init__(
        self,
        table: RoutingTable,
        triton: TritonPeer,
        tokenizer: TokenizerPeer,
        vision: VisionPeer,
        shadow: ShadowRunner,
        default_timeout: float = 30.0,
        max_batch_items: int = 256,
        version_stats: VersionStatsReporter | None = None,
    ):
        self.table, self.triton, self.tokenizer, self.vision = table, triton, tokenizer, vision
        self.version_stats = version_stats  # per-version figures for the registry's rollouts
        self.shadow, self.default_timeout, self.max_batch_items = shadow, default_timeout, max_batch_items

    # -- maas.v1.Router ----------------------------------------------------------------------------
    @_inflight
    @counted
    async def embed(self, ref: ModelRef, texts: list[str], timeout: float | None) -> EmbedResult:
        route, prepared, vectors = await self._matrix(ref, Payload(texts=texts), PreKind.TOKENIZER, timeout)
        if route.info.post_kind == PostKind.EMBEDDING:
            vectors = l2_normalise(vectors)
        return EmbedResult(vectors, prepared.truncated, route)

    @_inflight
    @counted
    async def classify(self, ref: ModelRef, images: list[bytes], k: int, timeout: float | None) -> ClassifyResult:
        route, _, logits = await self._matrix(ref, Payload(images=images), PreKind.VISION, timeout)
        info = route.info
        return ClassifyResult(top_k(softmax(logits), k or info.top_k or DEFAULT_TOP_K, info.labels), route)

    async def _matrix(
        self, ref: ModelRef, payload: Payload, needs: PreKind, timeout: float | None
    ) -> tuple[Route, Prepared, np.ndarray]:
        """Embed and Classify: texts/images through the version's pipeline to its [batch, n] output."""
        items, what, other = (
            (payload.texts, "texts", "Classify") if needs == PreKind.TOKENIZER else (payload.images, "images", "Embed")
        )
        if not items:
            raise InvalidArgument(f"no {what} given")
        self._check_items(len(items), what)
        route = self.route(ref)
        info = route.info
        refuse_generation(info, "Generate")
        if info.pre_kind != needs:
            raise InvalidArgument(
                f"model {info.model!r} v{info.version} does not take {what} "
                f"(preprocessing {info.pre_kind.name}); use {other} or Infer"
            )
        deadline = self._deadline(timeout)
        prepared = await self._prepare(info, payload, deadline)
        await self._check_inputs(info, _givens(prepared.tensors), deadline, batch_checked=False, caller_ids=False)
        start = time.perf_counter()
        outputs = await self._call_triton(
            info, prepared.tensors, [info.output_name] if info.output_name else [], deadline
        )
        matrix = self._post_matrix(info, outputs)
        self._shadow(route, payload, prepared, matrix, start)
        return route, prepared, matrix

    @_inflight
    @counted
    async def infer(self, ref: ModelRef, payload: Payload, outputs: list[str], timeout: float | None) -> InferResult:
        given = [
            kind
            for kind, items in (("inputs", payload.tensors), ("texts", payload.texts), ("images", payload.images))
            if items
        ]
        if len(given) != 1:
            raise InvalidArgument(f"give exactly one of inputs, texts or images (got {', '.join(given) or 'none'})")
        self._check_items(len(payload.texts) + len(payload.images), given[0])
        route = self.route(ref)
        info = route.info
        refuse_generation(info, "Generate")
        deadline = self._deadline(timeout)
        prepared = await self._prepare(info, payload, deadline)
        # Batches over the limit are sliced (_call_triton), except BYTES tensors, which go as they are.
        await self._check_inputs(
            info,
            _givens(prepared.tensors),
            deadline,
            batch_checked=any(t.datatype == "BYTES" for t in prepared.tensors),
            caller_ids=bool(payload.tensors),
        )
        start = time.perf_counter()
        result = await self._call_triton(info, prepared.tensors, outputs, deadline)
        if route.shadow is not None and info.output_name:
            self._shadow(route, payload, prepared, self._comparable(info, result), start)
        return InferResult(result, route)

    # -- Open Inference Protocol passthrough ---------------------------------------------------------
    @_inflight
    @counted
    async def infer_raw(self, request: bytes, routing_key: str, timeout: float | None) -> bytes:
        """A serialised inference.ModelInferRequest in, Triton's serialised response out, tensors untouched.
        An empty model_version follows the traffic policy; a non-numeric one is taken as an alias."""
        name, version = wire.read_model_ref(request)
        route = self.route(ModelRef(name, *version_selector(version), routing_key))
        info = route.info
        refuse_generation(info, "ModelStreamInfer")
        deadline = self._deadline(timeout)
        givens = _raw_givens(request)
        await self._check_inputs(info, givens, deadline, batch_checked=True, caller_ids=True)
        charge(_rows(info, givens[0].shape if givens else ()))  # cost units: batch rows
        start = time.perf_counter()
        response = await self.triton.infer_raw(self.retarget(request, name, info), deadline.remaining())
        if route.shadow is not None:
            self._shadow_raw(route, request, name, response, start)
        return response

    def retarget_stream_request(self, request: bytes, routing_key: str) -> tuple[bytes, Route]:
        """One request of an OIP ModelStreamInfer stream, routed like ModelInfer and retargeted to the
        chosen version (tensors untouched), with its route; decoupled (generation) models are welcome here."""
        name, version = wire.read_model_ref(request)
        route = self.route(ModelRef(name, *version_selector(version), routing_key))
        return self.retarget(request, name, route.info), route

    def resolve_for_metadata(self, name: str, version: str) -> VersionInfo:
        """The version metadata/readiness calls describe: the one asked for, else the default (no draw)."""
        number, alias = version_selector(version)
        if number:
            return self.table.version(name, number)
        if alias:
            return self.table.resolve(name, alias=alias).info
        return self.table.default(name)

    # -- pipeline steps ------------------------------------------------------------------------------
    def route(self, ref: ModelRef) -> Route:
        """The version for a request (counted in maas_router_requests_total and annotated on the span)."""
        if not ref.name:
            raise InvalidArgument("model.name is required")
        route = self.table.resolve(ref.name, ref.version, ref.alias, ref.routing_key)
        info = route.info
        note_routed(info)
        ROUTER_REQUESTS.labels(info.model, str(info.version), route.kind.name.lower()).inc()
        annotate(
            model=info.model,
            version=info.version,
            alias=ref.alias or None,
            route=route.kind.name.lower(),
            route_target=route.target or None,
            shadow=route.shadow is not None,
            shadow_version=route.shadow.version if route.shadow else None,
        )
        if log.isEnabledFor(logging.DEBUG):  # carries trace_id/span_id: from a log line to its trace
            log.debug(
                "routed",
                extra={
                    "model": info.model,
                    "version": info.version,
                    "route": route.kind.name.lower(),
                    "target": route.target,
                },
            )
        return route

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(timeout if timeout is not None else self.default_timeout)

    def _check_items(self, n: int, what: str) -> None:
        if n > self.max_batch_items:
            raise limit_error(f"number of {what}", self.max_batch_items, n)

    async def _prepare(self, info: VersionInfo, payload: Payload, deadline: Deadline) -> Prepared:
        if payload.texts:
            if info.pre_kind != PreKind.TOKENIZER:
                raise InvalidArgument(
                    f"model {info.model!r} v{info.version} takes no texts "
                    f"(preprocessing {info.pre_kind.name}); send inputs"
                )
            annotate(batch_size=len(payload.texts), items=len(payload.texts), preprocessing="tokenizer")
            start = time.perf_counter()
            tokenized = await self.tokenizer.tokenize(info.pre_name, payload.texts, deadline.remaining())
            annotate(preprocess_ms=(time.perf_counter() - start) * 1000, truncated=sum(tokenized.truncated))
            charge(sum(tokenized.original_lengths) or len(payload.texts))  # cost units: tokens
            wanted = {spec.name for spec in info.inputs}
            tensors = [t for t in tokenized.tensors if not wanted or t.name in wanted]
            return Prepared(tensors, tokenized.truncated)
        if payload.images:
            if info.pre_kind != PreKind.VISION:
                raise InvalidArgument(
                    f"model {info.model!r} v{info.version} takes no images "
                    f"(preprocessing {info.pre_kind.name}); send inputs"
                )
            annotate(
                batch_size=len(payload.images),
                items=len(payload.images),
                preprocessing="vision",
                bytes=sum(map(len, payload.images)),
            )
            input_name = info.inputs[0].name if info.inputs else ""
            start = time.perf_counter()
            tensor = await self.vision.preprocess(info.pre_name, payload.images, input_name, deadline.remaining())
            annotate(preprocess_ms=(time.perf_counter() - start) * 1000)
            charge(len(payload.images))  # cost units: images
            return Prepared([tensor], [])
        if payload.tensors and payload.tensors[0].shape:
            annotate(batch_size=int(payload.tensors[0].shape[0]))
        charge(_rows(info, payload.tensors[0].shape if payload.tensors else ()))  # cost units: batch rows
        return Prepared(list(payload.tensors), [])

    async def _check_inputs(
        self,
        info: VersionInfo,
        givens: list[signature.Given],
        deadline: Deadline,
        batch_checked: bool,
        caller_ids: bool,
    ) -> None:
        """Refuses what the version's signature and limits rule out, before Triton sees it. Ids the
        tokenizer produced are in its vocabulary: only a caller's own ids are checked against it."""
        if not info.inputs:
            return
        max_batch = await self.triton.max_batch_size(info.triton_model, info.triton_version, deadline.remaining())
        vocab = info.vocab_size if caller_ids else 0
        if (
            caller_ids
            and not vocab
            and info.pre_kind == PreKind.TOKENIZER
            and any(g.name == signature.IDS_INPUT for g in givens)
        ):
            vocab = await self.tokenizer.vocab_size(info.pre_name, deadline.remaining())
        signature.check(
            info,
            givens,
            signature.Limits(
                max_batch_size=max_batch if batch_checked else None,
                has_batch_dim=max_batch > 0,
                max_sequence_length=info.max_sequence_length,
                vocab_size=vocab,
            ),
        )

    async def _call_triton(
        self, info: VersionInfo, tensors: list[tensor_pb2.Tensor], outputs: list[str], deadline: Deadline
    ) -> list[tensor_pb2.Tensor]:
        """One Triton call, or (for a batch over the version's max_batch_size) concurrent slices that
        Triton's dynamic batcher schedules, joined back in order: callers need not know the limit."""
        model, version = info.triton_model, info.triton_version
        size = int(tensors[0].shape[0]) if tensors and tensors[0].shape else 0
        if size <= 1 or any(t.datatype == "BYTES" for t in tensors):
            return await self.triton.infer(model, version, tensors, outputs, deadline.remaining())
        limit = await self.triton.max_batch_size(model, version, deadline.remaining())
        if limit <= 0 or size <= limit:
            return await self.triton.infer(model, version, tensors, outputs, deadline.remaining())
        arrays = [(t.name, from_proto(t)) for t in tensors]
        try:
            async with asyncio.TaskGroup() as group:  # one slice failing cancels the others
                parts = [
                    group.create_task(
                        self.triton.infer(
                            model,
                            version,
                            [to_proto(name, a[start : start + limit]) for name, a in arrays],
                            outputs,
                            deadline.remaining(),
                        )
                    )
                    for start in range(0, size, limit)
                ]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        results = [part.result() for part in parts]
        return [
            to_proto(first.name, np.concatenate([from_proto(r[i]) for r in results]))
            for i, first in enumerate(results[0])
        ]

    def _post_matrix(self, info: VersionInfo, outputs: list[tensor_pb2.Tensor]) -> np.ndarray:
        tensor = next((t for t in outputs if t.name == info.output_name), outputs[0] if outputs else None)
        if tensor is None:
            raise FailedPrecondition(f"model {info.model!r} v{info.version} returned no output")
        return as_matrix(from_proto(tensor), f"model {info.model!r} v{info.version} output {tensor.name!r}")

    @staticmethod
    def _comparable(info: VersionInfo, outputs: list[tensor_pb2.Tensor]) -> np.ndarray | None:
        tensor = next((t for t in outputs if t.name == info.output_name), None)
        if tensor is None or tensor.datatype == "BYTES":
            return None
        array = from_proto(tensor)
        return array.reshape(array.shape[0], -1) if array.ndim >= 1 and array.shape[0] else None

    @staticmethod
    def retarget(request: bytes, name: str, info: VersionInfo) -> bytes:
        """The serialised request addressed to `info`'s Triton model and version (tensors untouched)."""
        return wire.with_model(
            request, name=info.triton_model if info.triton_model != name else None, version=info.triton_version
        )

    # -- shadow ------------------------------------------------------------------------------------
    def _shadow(
        self, route: Route, payload: Payload, prepared: Prepared, primary: np.ndarray | None, start: float
    ) -> None:
        shadow = route.shadow
        if shadow is None or primary is None:
            return
        primary_ms = (time.perf_counter() - start) * 1000
        info = route.info
        same_inputs = (shadow.pre_kind, shadow.pre_name, shadow.inputs) == (info.pre_kind, info.pre_name, info.inputs)

        async def shadow_output() -> np.ndarray | None:
            deadline = Deadline(self.shadow.timeout)
            tensors = prepared.tensors if same_inputs else (await self._prepare(shadow, payload, deadline)).tensors
            outputs = await self._call_triton(
                shadow, tensors, [shadow.output_name] if shadow.output_name else [], deadline
            )
            return self._comparable(shadow, outputs)

        async def primary_output() -> np.ndarray:
            return primary

        self.shadow.submit(info, shadow, primary_output, shadow_output, primary_ms)

    def _shadow_raw(self, route: Route, request: bytes, name: str, response: bytes, start: float) -> None:
        primary_ms = (time.perf_counter() - start) * 1000
        info, shadow = route.info, route.shadow

        def comparable(raw: bytes, version: VersionInfo) -> np.ndarray | None:
            tensor = output_tensor(service_pb2.ModelInferResponse.FromString(raw), version.output_name)
            return self._comparable(version, [tensor]) if tensor is not None else None

        async def shadow_output() -> np.ndarray | None:
            raw = await self.triton.infer_raw(self.retarget(request, name, shadow), self.shadow.timeout)
            return comparable(raw, shadow)

        async def primary_output() -> np.ndarray | None:
            return comparable(response, info)

        self.shadow.submit(info, shadow, primary_output, shadow_output, primary_ms)


def refuse_generation(info: VersionInfo, use: str) -> None:
    """A generation (decoupled) version answers with a stream: one-shot calls are pointed at `use`."""
    if info.post_kind == PostKind.GENERATION:
        raise InvalidArgument(
            f"model {info.model!r} v{info.version} is a generation model (decoupled: it streams tokens); use {use}"
        )


def _rows(info: VersionInfo, shape) -> int:
    """Batch rows of a tensor request (1 for a model without a batch dimension or no shape)."""
    return int(shape[0]) if shape and shape[0] > 0 else 1


def _givens(tensors: list[tensor_pb2.Tensor]) -> list[signature.Given]:
    return [signature.Given(t.name, t.datatype, tuple(t.shape), t.raw_contents) for t in tensors]


def _raw_givens(request: bytes) -> list[signature.Given]:
    """The inputs of a serialised ModelInferRequest (parsed for the check; the bytes go on untouched)."""
    try:
        parsed = service_pb2.ModelInferRequest.FromString(request)
    except DecodeError:
        raise InvalidArgument(
            "malformed ModelInferRequest: the request is not a valid inference.ModelInferRequest"
        ) from None
    raw = parsed.raw_input_contents
    if raw and len(raw) != len(parsed.inputs):
        raise InvalidArgument(
            f"expected {len(parsed.inputs)} raw input contents, got {len(raw)} (one per input, in order)"
        )
    return [
        signature.Given(i.name, i.datatype, tuple(i.shape), raw[n] if raw else None)
        for n, i in enumerate(parsed.inputs)
    ]


def version_selector(version: str) -> tuple[int, str]:
    """OIP model_version → (version number, alias): "" = policy, "3" = version 3, "canary" = an alias."""
    if not version:
        return 0, ""
    if version.isdigit() and not version.isascii():  # int() takes "١٢", raises on "²": neither is a version
        raise InvalidArgument(f"model_version {version!r}: a version number is written in ASCII digits 0-9")
    if version.isdigit():
        if int(version) <= 0:
            raise InvalidArgument(f"model_version {version!r}: versions start at 1")
        return int(version), ""
    return 0, version
