"""The passthrough reads and rewrites model name/version without touching tensors."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from services.router import wire
from services.shared.errors import InvalidArgument


def request(name="minilm", version="", parameters=True) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=name, model_version=version, id="req-1")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    req.raw_input_contents.append(np.arange(6, dtype="<f4").tobytes())
    req.outputs.add(name="y")
    if parameters:
        req.parameters["priority"].int64_param = 3
        req.parameters["flag"].bool_param = True
    return req


@pytest.mark.parametrize("name,version", [("minilm", ""), ("m" * 300, "12"), ("efficientnet_lite0", "canary")])
def test_read_model_ref(name, version):
    assert wire.read_model_ref(request(name, version).SerializeToString()) == (name, version)


def test_rewrite_version_and_name_keeps_everything_else():
    original = request("minilm", "")
    raw = wire.with_model(original.SerializeToString(), version="2")
    parsed = service_pb2.ModelInferRequest.FromString(raw)
    assert parsed.model_version == "2" and parsed.model_name == "minilm"
    assert wire.read_model_ref(raw) == ("minilm", "2")
    parsed.model_version = ""
    assert parsed == original
    renamed = service_pb2.ModelInferRequest.FromString(wire.with_model(raw, name="other", version="7"))
    assert (renamed.model_name, renamed.model_version, renamed.raw_input_contents) == (
        "other",
        "7",
        original.raw_input_contents,
    )
    assert wire.with_model(raw) is raw


@pytest.mark.parametrize("garbage", [b"\x0a\xff", b"\x0a\x05abc", b"\x0f", b"\x80"])
def test_malformed_requests_are_invalid_argument(garbage):
    with pytest.raises(InvalidArgument, match="malformed"):
        wire.read_model_ref(garbage)
