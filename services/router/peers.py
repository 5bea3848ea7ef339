"""Clients for the router's peers: tokenizer and vision over one long-lived channel each, Triton over a
pool of replicas (services.shared.replica_pool: one channel per replica, calls spread by in-flight count).

Every call gets the caller's remaining deadline and wait_for_ready=False, so a peer that is down
fails fast with UNAVAILABLE instead of hanging; cancelling the caller cancels the awaited call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from time import monotonic

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas.v1 import tensor_pb2, tokenizer_pb2, tokenizer_pb2_grpc, vision_pb2, vision_pb2_grpc
from services.router import wire
from services.router.triton_errors import NOT_SERVING_CODES, NOT_SERVING_MARKER, model_input_error, not_serving
from services.shared.errors import ServiceError, Unavailable, bounded
from services.shared.replica_pool import Replica, ReplicaPool

log = logging.getLogger(__name__)

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


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
    original_lengths: list[int] = field(default_factory=list)


class TokenizerPeer:
    def __init__(self, channel: grpc.aio.Channel, address: str = ""):
        self._stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self.peer = f"the tokenizer service ({address})"
        self._vocab: dict[str, int] = {}

    @names_peer
    async def vocab_size(self, tokenizer: str, timeout: float | None) -> int:
        """The named tokenizer's vocabulary size (0 when the service does not list it), fetched once."""
        if tokenizer not in self._vocab:
            listed = await self._stub.ListTokenizers(
                tokenizer_pb2.ListTokenizersRequest(), timeout=timeout, wait_for_ready=False
            )
            for info in listed.tokenizers:
                self._vocab[info.name] = int(info.vocab_size)
            name = tokenizer or listed.default_tokenizer
            self._vocab[tokenizer] = self._vocab.get(name, 0)
        return self._vocab[tokenizer]

    @names_peer
    async def tokenize(self, tokenizer: str, texts: list[str], timeout: float | None) -> Tokenized:
        request = tokenizer_pb2.TokenizeRequest(tokenizer=tokenizer, texts=texts, padding=tokenizer_pb2.PADDING_LONGEST)
        response = await self._stub.Tokenize(request, timeout=timeout, wait_for_ready=False)
        return Tokenized(
            list(response.tensors),
            [item.truncated for item in response.items],
            [item.original_length for item in response.items],
        )

    @names_peer
    async def chat_template(self, tokenizer: str, messages: list[tuple[str, str]], timeout: float | None) -> list[int]:
        """The messages rendered with the tokenizer's chat template (assistant turn opened), as ids."""
        request = tokenizer_pb2.ChatTemplateRequest(
            tokenizer=tokenizer,
            add_generation_prompt=True,
            messages=[tokenizer_pb2.TemplateMessage(role=role, content=content) for role, content in messages],
        )
        response = await self._stub.ApplyChatTemplate(request, timeout=timeout, wait_for_ready=False)
        return list(response.input_ids)

    @names_peer
    async def tokenizer_definition(
        self, tokenizer: str, if_none_match: str, timeout: float | None
    ) -> tokenizer_pb2.GetTokenizerResponse:
        """The tokenizer's tokenizer.json and digest (no text when `if_none_match` is still its digest)."""
        request = tokenizer_pb2.GetTokenizerRequest(tokenizer=tokenizer, if_none_match=if_none_match)
        return await self._stub.GetTokenizer(request, timeout=timeout, wait_for_ready=False)


class VisionPeer:
    def __init__(self, channel: grpc.aio.Channel, address: str = ""):
        self._stub = vision_pb2_grpc.VisionStub(channel)
        self.peer = f"the vision service ({address})"

    @names_peer
    async def preprocess(
        self, spec: str, images: list[bytes], output_name: str, timeout: float | None
    ) -> tensor_pb2.Tensor:
        request = vision_pb2.PreprocessRequest(spec=spec, images=images, output_name=output_name)
        response = await self._stub.Preprocess(request, timeout=timeout, wait_for_ready=False)
        return response.tensor


def raw_model_infer(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """ModelInfer taking and returning bytes (module-level so Replica.stub caches it per channel)."""
    return channel.unary_unary(MODEL_INFER_METHOD)


TritonStub = service_pb2_grpc.GRPCInferenceServiceStub


def raw_model_stream_infer(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """ModelStreamInfer with serialised messages both ways (the OIP passthrough)."""
    return channel.stream_stream(MODEL_STREAM_INFER_METHOD)


def model_stream_infer(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """ModelStreamInfer with service_pb2 messages (the router's own generation requests)."""
    return channel.stream_stream(
        MODEL_STREAM_INFER_METHOD,
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )


def never_sent(code: grpc.StatusCode, at_issue: grpc.ChannelConnectivity, at_failure: grpc.ChannelConnectivity) -> bool:
    """The request never left the router: UNAVAILABLE on a channel that had no connection when the call
    was issued and is in TRANSIENT_FAILURE when it failed, i.e. gRPC failed the call for want of a
    connection (wait_for_ready is off). From status and channel state, not from a message; the fast
    path decides it the same way (protos/maas/v1/fastpath.proto, rule 3)."""
    return (
        code == grpc.StatusCode.UNAVAILABLE
        and at_issue != grpc.ChannelConnectivity.READY
        and at_failure == grpc.ChannelConnectivity.TRANSIENT_FAILURE
    )


def not_serving_reply(code: grpc.StatusCode, details: str) -> bool:
    """Triton answered that this replica does not serve the version (restarted, still loading)."""
    return code in NOT_SERVING_CODES and details.startswith(NOT_SERVING_MARKER)


def retry_reason(
    code: grpc.StatusCode, details: str, at_issue: grpc.ChannelConnectivity, at_failure: grpc.ChannelConnectivity
) -> str:
    """Retry rule (the fast path's too: protos/maas/v1/fastpath.proto, rule 3): why a failed call may go
    to another replica - "never_sent" (never_sent) or "not_serving" (Triton refused it because that
    replica does not serve the version) - or "" when it may have reached the model (reset, GOAWAY
    mid-call, Triton's own UNAVAILABLE, deadline): not retried."""
    if never_sent(code, at_issue, at_failure):
        return "never_sent"
    return "not_serving" if not_serving_reply(code, details) else ""


def retryable(exc: grpc.aio.AioRpcError) -> bool:
    """A failure that says the replica is unwell (what outlier ejection counts)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE or not_serving_reply(exc.code(), exc.details() or "")


@dataclass
class Failed(Exception):
    """One attempt's failure and why it may be retried elsewhere (retry_reason; "" = it may not)."""

    error: grpc.aio.AioRpcError
    reason: str


class TritonPeer:
    """Triton's own gRPC API through the raw generated stub, each call on a replica of the pool.

    A call that provably never ran (see retry_reason) is retried once on each other serving replica
    while the caller's deadline and the pool's retry budget last; anything else is the caller's
    answer. Every call's outcome feeds the pool's outlier ejection.
    """

    def __init__(self, pool: ReplicaPool):
        self.pool = pool
        self._max_batch: dict[tuple[str, str], int] = {}  # versions are immutable: cache forever
        self._parameters: dict[tuple[str, str], dict[str, str]] = {}

    async def max_batch_size(self, model: str, version: str, timeout: float | None) -> int:
        """The version's max_batch_size from Triton's config (0 = no batch dimension), fetched once."""
        key = (model, version)
        if key not in self._max_batch:
            request = service_pb2.ModelConfigRequest(name=model, version=version)
            response = await self._call(TritonStub, "ModelConfig", request, timeout)
            self._max_batch[key] = int(response.config.max_batch_size)
        return self._max_batch[key]

    async def infer(
        self, model: str, version: str, inputs: list[tensor_pb2.Tensor], outputs: list[str], timeout: float | None
    ) -> list[tensor_pb2.Tensor]:
        request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        for tensor in inputs:
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(tensor.raw_contents)
        for name in outputs:
            request.outputs.add(name=name)
        response = await self._call(TritonStub, "ModelInfer", request, timeout)
        return [
            tensor_pb2.Tensor(name=o.name, datatype=o.datatype, shape=o.shape, raw_contents=raw)
            for o, raw in zip(response.outputs, response.raw_output_contents)
        ]

    async def infer_raw(self, request: bytes, timeout: float | None) -> bytes:
        """Bytes in, bytes out: the passthrough never parses or re-serialises tensors."""
        return await self._call(raw_model_infer, None, request, timeout)

    async def model_parameters(self, model: str, version: str, timeout: float | None) -> dict[str, str]:
        """The string parameters of the version's Triton config (a generation model's limits), fetched once."""
        key = (model, version)
        if key not in self._parameters:
            request = service_pb2.ModelConfigRequest(name=model, version=version)
            response = await self._call(TritonStub, "ModelConfig", request, timeout)
            self._parameters[key] = {k: p.string_value for k, p in response.config.parameters.items()}
        return self._parameters[key]

    @contextlib.asynccontextmanager
    async def stream(
        self, timeout: float | None, raw: bool = False, metadata: tuple = ()
    ) -> AsyncIterator[grpc.aio.StreamStreamCall]:
        """A ModelStreamInfer call on one replica, counted in its in-flight calls while open, and
        cancelled when the block ends however it ends (Triton then cancels the requests still running
        on it: that is how a caller's cancel or deadline reaches a decoupled model). Not retried: a
        stream's requests may have reached the model."""
        self.pool.request()
        replica = self.pool.pick()
        with replica.counted():
            call = replica.stub(raw_model_stream_infer if raw else model_stream_infer)(
                timeout=timeout, wait_for_ready=False, metadata=metadata or None
            )
            try:
                yield call
            except grpc.aio.AioRpcError as exc:
                self.pool.report(replica, ok=not retryable(exc))
                raise
            else:
                self.pool.report(replica, ok=True)
            finally:
                call.cancel()

    async def call(self, method: str, request, timeout: float | None):
        """Any other unary method of Triton's API by name, e.g. call("ModelMetadata", req, 5)."""
        return await self._call(TritonStub, method, request, timeout)

    async def _call(self, factory, method: str | None, request, timeout: float | None):
        started = monotonic()
        self.pool.request()
        replica = self.pool.pick()
        try:
            return await self._attempt(replica, factory, method, request, timeout)
        except Failed as failed:
            if not retryable(failed.error):
                raise _answer(failed.error, request) from None
            failure = failed
        return await self._retry(replica, failure, factory, method, request, timeout, started)

    async def _attempt(self, replica: Replica, factory, method: str | None, request, timeout: float | None):
        """One call on one replica; its outcome goes to the pool's outlier detection."""
        at_issue = replica.channel.get_state()
        try:
            response = await _attempt(replica, factory, method, request, timeout)
        except grpc.aio.AioRpcError as exc:
            self.pool.report(replica, ok=not retryable(exc))
            reason = retry_reason(exc.code(), exc.details() or "", at_issue, replica.channel.get_state())
            raise Failed(exc, reason) from None
        self.pool.report(replica, ok=True)
        return response

    async def _retry(
        self,
        replica: Replica,
        failure: Failed,
        factory,
        method: str | None,
        request,
        timeout: float | None,
        started: float,
    ):
        tried = {replica}
        refused = ""
        while failure.reason:
            remaining = None if timeout is None else timeout - (monotonic() - started)
            others = any(r not in tried for r in self.pool.replicas())
            if not others or (remaining is not None and remaining <= 0):
                break
            # A call that never left costs no Triton anything: only retries after a replica answered
            # (refused a version it does not serve) draw on the budget.
            if failure.reason != "never_sent" and not self.pool.try_retry():
                refused = "; not retried on another replica: the retry budget is spent"
                break
            replica = self.pool.pick(exclude=tried)
            tried.add(replica)
            log.debug(
                "retrying a Triton call on another replica",
                extra={"failed": failure.error.details(), "replica": replica.address},
            )
            try:
                return await self._attempt(replica, factory, method, request, remaining)
            except Failed as failed:
                if not retryable(failed.error):
                    raise _answer(failed.error, request) from None
                failure = failed
        answer = _answer(failure.error, request)
        if isinstance(answer, grpc.aio.AioRpcError):
            answer = Unavailable(f"Triton ({replica.address}) is unavailable: {failure.error.details()}")
        if refused:
            answer.message = bounded(answer.message + refused)
        raise answer from None


def _answer(exc: grpc.aio.AioRpcError, request) -> ServiceError | grpc.aio.AioRpcError:
    """What a Triton failure means to the caller (triton_errors.py); else Triton's own status."""
    return not_serving(exc.code(), exc.details() or "", *_model_of(request)) or model_input_error(exc) or exc


def _model_of(request) -> tuple[str, str]:
    """(model, version) a Triton request names: serialised ModelInferRequest bytes or a parsed message."""
    if isinstance(request, bytes):
        return wire.read_model_ref(request)
    name = getattr(request, "model_name", None) or getattr(request, "name", "")
    return name, getattr(request, "model_version", None) or getattr(request, "version", "")


async def _attempt(replica: Replica, factory, method: str | None, request, timeout: float | None):
    """One call on one replica, counted in its in-flight and call totals (what pick() balances on)."""
    with replica.counted():
        rpc = replica.stub(factory)
        return await (getattr(rpc, method) if method else rpc)(request, timeout=timeout, wait_for_ready=False)


def output_tensor(response: service_pb2.ModelInferResponse, name: str) -> tensor_pb2.Tensor | None:
    """One output of a (parsed) ModelInferResponse as a maas Tensor; None when absent."""
    for i, out in enumerate(response.outputs):
        if (not name or out.name == name) and i < len(response.raw_output_contents):
            return tensor_pb2.Tensor(
                name=out.name, datatype=out.datatype, shape=out.shape, raw_contents=response.raw_output_contents[i]
            )
    return None
