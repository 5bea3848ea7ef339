"""gRPC ⇄ domain for the router: maas.v1.Router and the Open Inference Protocol (inference.GRPCInferenceService).

Only conversions here; the work is in dataplane.py. The OIP ModelInfer handler takes and returns raw
bytes (no deserialiser), so tensors are forwarded to Triton without being parsed.
"""

from __future__ import annotations

from importlib.metadata import version as package_version

import grpc
from tritonclient.grpc import service_pb2

from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.router import oip_stream, wire
from services.router.admission import Admission, AdmissionSettings
from services.router.dataplane import ClassifyResult, Dataplane, ModelRef, Payload, version_selector
from services.router.generation import Generation, Piece, Prompt, Sampling
from services.router.peers import TritonPeer
from services.router.routing import Route, RoutingTable
from services.router.triton_errors import oip_worded
from services.shared.errors import ServiceError

OIP_SERVICE = "inference.GRPCInferenceService"
# Metadata key that carries a sticky routing key on Open Inference Protocol calls.
ROUTING_KEY_METADATA = "x-maas-routing-key"
# Repository, shared-memory and settings calls would let callers change Triton behind the registry.
_REFUSED_OIP_METHODS = (
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


def model_ref(ref: tensor_pb2.ModelRef) -> ModelRef:
    which = ref.WhichOneof("selector")
    return ModelRef(
        ref.name, ref.version if which == "version" else 0, ref.alias if which == "alias" else "", ref.routing_key
    )


def decision(route: Route) -> tensor_pb2.RoutingDecision:
    return tensor_pb2.RoutingDecision(
        model=route.info.model,
        version=route.info.version,
        kind=int(route.kind),  # type: ignore[arg-type]  # protoc .pyi: enum fields typed as the enum class, ints accepted
        target=route.target,
        shadowed=route.shadow is not None,
    )


def classify_response(result: ClassifyResult) -> router_pb2.ClassifyResponse:
    return router_pb2.ClassifyResponse(
        results=[
            router_pb2.Classification(
                classes=[router_pb2.ClassScore(index=c.index, label=c.label, score=c.score) for c in scores]
            )
            for scores in result.classes
        ],
        routed=decision(result.route),
    )


def sampling(s: router_pb2.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=s.max_tokens,
        top_k=s.top_k,
        stop=tuple(s.stop),
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
    )


def prompt(request: router_pb2.GenerateRequest) -> Prompt:
    which = request.WhichOneof("input")
    if which == "prompt":
        return Prompt(text=request.prompt)
    if which == "messages":
        return Prompt(messages=tuple((m.role, m.content) for m in request.messages.messages))
    return Prompt()


def generate_response(piece: Piece) -> router_pb2.GenerateResponse:
    response = router_pb2.GenerateResponse(text=piece.text, token_ids=piece.token_ids, finish_reason=int(piece.finish))  # type: ignore[arg-type]
    if piece.route is not None:
        response.routed.CopyFrom(decision(piece.route))
    if piece.usage is not None:
        response.usage.CopyFrom(router_pb2.Usage(prompt_tokens=piece.usage[0], completion_tokens=piece.usage[1]))
    return response


def _admit(admission: Admission, context, method: str, ref: ModelRef):
    return admission.admit(context.invocation_metadata(), method, ref.name, ref.version, ref.alias)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, plane: Dataplane, generation: Generation, admission: Admission | None = None):
        self.plane, self.generation = plane, generation
        self.admission = admission or Admission(AdmissionSettings())

    async def Generate(self, request, context):
        ref = model_ref(request.model)
        ticket = _admit(self.admission, context, "Generate", ref).open()
        try:  # generated tokens are the cost units, charged as they stream
            async for piece in self.generation.stream(
                ref, prompt(request), sampling(request.sampling), context.time_remaining()
            ):
                ticket.charge(len(piece.token_ids))
                yield generate_response(piece)
        finally:
            ticket.close()

    async def GenerateUnary(self, request, context):
        ref = model_ref(request.model)
        with _admit(self.admission, context, "GenerateUnary", ref) as ticket:
            whole = await self.generation.collect(
                ref, prompt(request), sampling(request.sampling), context.time_remaining()
            )
            ticket.charge(len(whole.token_ids))
            return generate_response(whole)

    async def Embed(self, request, context):
        ref = model_ref(request.model)
        with _admit(self.admission, context, "Embed", ref):
            result = await self.plane.embed(ref, list(request.texts), context.time_remaining())
        return router_pb2.EmbedResponse(
            embeddings=[router_pb2.Embedding(values=row.tolist()) for row in result.vectors],
            dimensions=int(result.vectors.shape[1]),
            truncated=result.truncated,
            routed=decision(result.route),
        )

    async def Classify(self, request, context):
        ref = model_ref(request.model)
        with _admit(self.admission, context, "Classify", ref):
            result = await self.plane.classify(ref, list(request.images), request.top_k, context.time_remaining())
        return classify_response(result)

    async def Infer(self, request, context):
        payload = Payload(tensors=list(request.inputs), texts=list(request.texts), images=list(request.images))
        ref = model_ref(request.model)
        with _admit(self.admission, context, "Infer", ref):
            result = await self.plane.infer(ref, payload, list(request.outputs), context.time_remaining())
        return router_pb2.InferResponse(outputs=result.outputs, routed=decision(result.route))


class InferenceServicer:
    """Triton's own API, answered from the routing table and forwarded to Triton per version."""

    def __init__(
        self,
        plane: Dataplane,
        table: RoutingTable,
        triton: TritonPeer,
        server_name: str = "maas-router",
        server_version: str = "",
        admission: Admission | None = None,
    ):
        self.plane, self.table, self.triton = plane, table, triton
        self.server_name, self.server_version = server_name, server_version or package_version("maas-mesh")
        self.admission = admission or Admission(AdmissionSettings())

    def _admit_raw(self, metadata, method: str, request: bytes):
        name, version = wire.read_model_ref(request)
        number, alias = version_selector(version)
        return self.admission.admit(metadata, method, name, number, alias)

    async def ModelInfer(self, request: bytes, context) -> bytes:
        if not self.admission.active:
            return await self.plane.infer_raw(request, _routing_key(context), context.time_remaining())
        with self._admit_raw(context.invocation_metadata(), "ModelInfer", request):
            return await self.plane.infer_raw(request, _routing_key(context), context.time_remaining())

    async def ModelStreamInfer(self, request_iterator, context):
        """Serialised requests in, Triton's serialised stream responses out (oip_stream.py). With auth on the
        key is checked when the stream opens; each request's model and quota as it comes (a refusal is that
        request's error response, as for any request the router cannot route)."""
        check = None
        if self.admission.active:
            metadata = context.invocation_metadata()
            if self.admission.settings.auth:
                self.admission.authenticate(metadata)

            def check(request: bytes) -> None:
                self._admit_raw(metadata, "ModelStreamInfer", request)

        async for response in oip_stream.relay(
            self.plane, request_iterator, _routing_key(context), context.time_remaining(), check=check
        ):
            yield response

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        if not self.table.has_state:
            return service_pb2.ServerReadyResponse(ready=False)
        try:
            triton = await self.triton.call("ServerReady", request, _short(context))
        except (grpc.aio.AioRpcError, ServiceError):
            return service_pb2.ServerReadyResponse(ready=False)
        return service_pb2.ServerReadyResponse(ready=triton.ready)

    async def ServerMetadata(self, request, context):
        try:
            extensions = list((await self.triton.call("ServerMetadata", request, _short(context))).extensions)
        except (grpc.aio.AioRpcError, ServiceError):
            extensions = []
        return service_pb2.ServerMetadataResponse(
            name=self.server_name, version=self.server_version, extensions=extensions
        )

    async def ModelReady(self, request, context):
        try:
            info = self.plane.resolve_for_metadata(request.name, request.version)
        except ServiceError:
            return service_pb2.ModelReadyResponse(ready=False)  # Triton's answer for an unknown model, too
        if not info.ready:
            return service_pb2.ModelReadyResponse(ready=False)
        forwarded = service_pb2.ModelReadyRequest(name=info.triton_model, version=info.triton_version)
        return await self.triton.call("ModelReady", forwarded, context.time_remaining())

    async def ModelMetadata(self, request, context):
        info = self.plane.resolve_for_metadata(request.name, request.version)
        forwarded = service_pb2.ModelMetadataRequest(name=info.triton_model, version=info.triton_version)
        response = await self.triton.call("ModelMetadata", forwarded, context.time_remaining())
        response.name = request.name
        del response.versions[:]
        response.versions.extend(str(v) for v in self.table.model(request.name).ready_versions())
        return response

    async def ModelConfig(self, request, context):
        info = self.plane.resolve_for_metadata(request.name, request.version)
        forwarded = service_pb2.ModelConfigRequest(name=info.triton_model, version=info.triton_version)
        return await self.triton.call("ModelConfig", forwarded, context.time_remaining())

    async def ModelStatistics(self, request, context):
        if request.name:
            info = self.plane.resolve_for_metadata(request.name, request.version)
            request = service_pb2.ModelStatisticsRequest(
                name=info.triton_model, version=request.version and info.triton_version
            )
        return await self.triton.call("ModelStatistics", request, context.time_remaining())


def _routing_key(context) -> str:
    key = next((v for k, v in context.invocation_metadata() or () if k == ROUTING_KEY_METADATA), "")
    return key if isinstance(key, str) else key.decode()


def _short(context) -> float:
    remaining = context.time_remaining()
    return min(remaining, 2.0) if remaining is not None else 2.0


def _refuse(method: str):
    async def refused(request, context):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not served by the router: manage models through the registry (maas models …)",
        )

    return refused


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> str:
    """Register the OIP service; returns its full name (for health and reflection)."""

    def typed(method: str, request_type: str):
        return grpc.unary_unary_rpc_method_handler(
            oip_worded(getattr(servicer, method)),
            request_deserializer=getattr(service_pb2, request_type).FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )

    handlers = {
        # Bytes in, bytes out.
        "ModelInfer": grpc.unary_unary_rpc_method_handler(oip_worded(servicer.ModelInfer)),
        **{
            name: typed(name, f"{name}Request")
            for name in (
                "ServerLive",
                "ServerReady",
                "ServerMetadata",
                "ModelReady",
                "ModelMetadata",
                "ModelConfig",
                "ModelStatistics",
            )
        },
        # Bytes in, bytes out, too: one Triton stream per caller stream.
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer),
        **{name: grpc.unary_unary_rpc_method_handler(_refuse(name)) for name in _REFUSED_OIP_METHODS},
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(OIP_SERVICE, handlers),))
    return OIP_SERVICE
