"""Fuzzing every RPC of every service of a running mesh with raw bytes and with hostile-but-valid
messages: the error contract holds (never UNKNOWN, never INTERNAL, nothing else than the statuses the
contract lists) and every service still serves afterwards.

hypothesis has no protobuf strategy, so `messages()` walks a message descriptor (a few lines; every
field gets values of its type: empty, huge, negative, non-ASCII, nested). Examples per RPC and sizes
are bounded so the whole file runs in a couple of minutes.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as oip_pb2

from maas.client import MeshClient
from maas.v1 import registry_pb2, router_pb2, tokenizer_pb2, vision_pb2

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
EXAMPLES = 25
CALL_TIMEOUT = 5.0
# Metadata gRPC allows (a header over its limit is the client's own error, not the server's).
MAX_STATUS_MESSAGE = 8 * 1024

# (address key in LocalMesh.addresses, service descriptor)
SERVICES = [
    ("router", router_pb2.DESCRIPTOR.services_by_name["Router"]),
    ("router", oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
    ("router_oip_fast", oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
    ("registry", registry_pb2.DESCRIPTOR.services_by_name["Registry"]),
    ("tokenizer", tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]),
    ("vision", vision_pb2.DESCRIPTOR.services_by_name["Vision"]),
]
METHODS = [(key, method) for key, service in SERVICES for method in service.methods]

_SCALARS = {
    FieldDescriptor.TYPE_STRING: st.text(max_size=40) | st.sampled_from(["", "minilm-fuzz", "../../etc", "x" * 300]),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}


def messages(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of `descriptor` with random values in a random subset of its fields."""
    cls = GetMessageClass(descriptor)

    def field_values(field):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3 or field.message_type.GetOptions().map_entry:
                return st.none()
            value = messages(field.message_type, depth + 1)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            value = st.sampled_from([v.number for v in field.enum_type.values] + [999])
        else:
            value = _SCALARS[field.type]
        return st.lists(value, max_size=4) if field.label == FieldDescriptor.LABEL_REPEATED else value

    fields = [f for f in descriptor.fields]

    @st.composite
    def build(draw):
        message = cls()
        for field in draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields))) if fields else []:
            value = draw(field_values(field))
            if value is None:
                continue
            try:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    if field.label == FieldDescriptor.LABEL_REPEATED:
                        getattr(message, field.name).extend(value)
                    else:
                        getattr(message, field.name).CopyFrom(value)
                elif field.label == FieldDescriptor.LABEL_REPEATED:
                    getattr(message, field.name).extend(value)
                else:
                    setattr(message, field.name, value)
            except (ValueError, TypeError):
                pass  # e.g. a oneof sibling or a value the Python runtime refuses: leave the field out
        return message

    return build()


def payloads(method) -> st.SearchStrategy:
    """Raw bytes (mostly unparseable, sometimes invalid UTF-8 in a string field) or a valid message."""
    return st.binary(max_size=256) | messages(method.input_type).map(lambda m: m.SerializeToString())


def call(channel: grpc.Channel, service_name: str, method, payload: bytes) -> grpc.StatusCode:
    path = f"/{service_name}/{method.name}"
    identity = lambda b: b
    try:
        if method.client_streaming and method.server_streaming:
            responses = channel.stream_stream(path, identity, identity)(iter([payload, payload]), timeout=CALL_TIMEOUT)
            for _ in zip(range(4), responses):
                pass
            responses.cancel()
        elif method.client_streaming:
            channel.stream_unary(path, identity, identity)(iter([payload, payload]), timeout=CALL_TIMEOUT)
        elif method.server_streaming:
            responses = channel.unary_stream(path, identity, identity)(payload, timeout=CALL_TIMEOUT)
            for _ in zip(range(4), responses):
                pass
            responses.cancel()
        else:
            channel.unary_unary(path, identity, identity)(payload, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and method.server_streaming:
            return grpc.StatusCode.OK, ""  # our own cancel after reading a few messages
        assert len(err.details() or "") <= MAX_STATUS_MESSAGE, f"{path}: status message of {len(err.details())} chars"
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def channels(mesh):
    opened = {key: grpc.insecure_channel(mesh.addresses[key]) for key in {k for k, _ in SERVICES}}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.mark.parametrize("key, method", METHODS, ids=[f"{k}:{m.containing_service.name}.{m.name}" for k, m in METHODS])
def test_rpc_keeps_the_error_contract(channels, key, method):
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payload=payloads(method))
    def fuzz(payload):
        code, details = call(channels[key], method.containing_service.full_name, method, payload)
        assert code in ALLOWED, f"{method.full_name}: {code.name}: {details[:300]!r} for {payload[:80]!r}"

    fuzz()


def test_every_service_still_serves(mesh, channels):
    for key in ("router", "registry", "tokenizer", "vision"):
        status = health_pb2_grpc.HealthStub(channels[key]).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, key
    with MeshClient(mesh.router_address, timeout=30) as client:
        assert client.embed(["after the fuzz"], "minilm").vectors.shape == (1, 384)
