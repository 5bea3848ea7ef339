"""The Open Inference Protocol through the router, with an unmodified tritonclient, against the real Triton."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from skimage import data
from tokenizers import Tokenizer

from maas.client import MeshClient
from tests.fixtures.mesh import register_tiny

REPO_MODELS = __import__("pathlib").Path(__file__).resolve().parents[2] / "model_repository"
TIMEOUT = 30


@pytest.fixture(scope="module", params=["router", "router_oip_fast"])
def clients(mesh, request):
    """(client of the router: its main port, then its OIP fast path; client of Triton)."""
    with (
        grpcclient.InferenceServerClient(mesh.addresses[request.param]) as routed,
        grpcclient.InferenceServerClient(mesh.addresses["triton"]) as direct,
    ):
        yield routed, direct


def minilm_inputs(texts):
    tokenizer = Tokenizer.from_file(str(REPO_MODELS / "minilm" / "tokenizer.json"))
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    arrays = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    inputs = []
    for name, values in arrays.items():
        array = np.array(values, np.int64)
        inputs.append(grpcclient.InferInput(name, list(array.shape), "INT64"))
        inputs[-1].set_data_from_numpy(array)
    return inputs


def cat_tensor():
    spec = json.loads((REPO_MODELS / "efficientnet_lite0" / "preprocess.json").read_text())
    img = Image.fromarray(data.chelsea()).convert("RGB")
    scale = spec["resize_shorter"] / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    ch, cw = spec["crop"]
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    x = np.asarray(img.crop((left, top, left + cw, top + ch)), np.float32) / 255.0
    x = ((x - np.float32(spec["mean"])) / np.float32(spec["std"])).transpose(2, 0, 1)[None]
    inp = grpcclient.InferInput("INPUT__0", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x))
    return [inp]


@pytest.mark.parametrize(
    "model,inputs,output",
    [
        ("minilm", lambda: minilm_inputs(["hello world", "the router forwards raw tensors"]), "sentence_embedding"),
        ("efficientnet_lite0", cat_tensor, "OUTPUT__0"),
    ],
)
def test_tritonclient_gets_the_same_output_through_the_router(clients, model, inputs, output):
    routed, direct = clients
    via_router = routed.infer(model, inputs(), client_timeout=TIMEOUT, request_id="r1")
    via_triton = direct.infer(model, inputs(), model_version="1", client_timeout=TIMEOUT, request_id="r1")
    np.testing.assert_allclose(via_router.as_numpy(output), via_triton.as_numpy(output), rtol=1e-5, atol=1e-6)
    response = via_router.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "r1")


def test_readiness_and_metadata_through_the_router(clients):
    routed, direct = clients
    assert routed.is_server_live() and routed.is_server_ready()
    assert routed.is_model_ready("minilm") and routed.is_model_ready("minilm", "1")
    assert not routed.is_model_ready("minilm", "99") and not routed.is_model_ready("no_such_model")
    meta = routed.get_model_metadata("efficientnet_lite0", as_json=True)
    direct_meta = direct.get_model_metadata("efficientnet_lite0", "1", as_json=True)
    assert meta["name"] == "efficientnet_lite0" and "1" in meta["versions"]
    assert meta["inputs"] == direct_meta["inputs"] and meta["outputs"] == direct_meta["outputs"]
    config = routed.get_model_config("minilm", as_json=True)["config"]
    assert config["name"] == "minilm" and int(config["max_batch_size"]) > 0


def test_a_third_model_needs_no_router_change(mesh, mesh_registry, clients, tmp_path):
    version = register_tiny(mesh_registry, "third_tiny", tmp_path, scale=2.0)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with MeshClient(mesh.router_address) as client:
        result = client.infer("third_tiny", {"x": x}, timeout=TIMEOUT)
    np.testing.assert_allclose(result.outputs["y"], 2 * x)
    assert (result.routed.model, result.routed.version) == ("third_tiny", version)
    routed, _ = clients
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    response = routed.infer("third_tiny", [inp], client_timeout=TIMEOUT)
    np.testing.assert_allclose(response.as_numpy("y"), 2 * x)
    assert response.get_response().model_version == str(version)


def int64_inputs(shape, value=1) -> list:
    inputs = []
    for name, fill in (("input_ids", value), ("attention_mask", 1), ("token_type_ids", 0)):
        inp = grpcclient.InferInput(name, list(shape), "INT64")
        inp.set_data_from_numpy(np.full(shape, fill, np.int64))
        inputs.append(inp)
    return inputs


def refusal(client, model, inputs, version=""):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs, model_version=version, client_timeout=TIMEOUT)
    return caught.value.status(), caught.value.message()


def test_one_error_contract_on_both_router_ports(mesh):
    """Input the model refuses is INVALID_ARGUMENT (not a retryable UNAVAILABLE) with Triton's words; the
    errors Triton defines keep its wording; messages that echo a large input are cut, not lost to
    gRPC's metadata limit; both ports answer alike."""
    model_side = {  # (model, inputs, words): the router refuses ids itself (signature.py), before Triton
        # minilm is registered with max_sequence_length 512 (its position embeddings): refused by the router
        "sequence too long": (
            "minilm",
            int64_inputs((1, 5000)),
            "sequence length 5000 exceeds the model's maximum of 512",
        ),
        "ids outside the vocabulary": ("minilm", int64_inputs((1, 8), 10**9), "outside the vocabulary [0, 30522)"),
        "a zero dimension": ("minilm", int64_inputs((1, 0)), "ONNXRuntimeError"),
    }
    huge_name = "m" * 100_000
    answers = {}
    for port in ("router", "router_oip_fast"):
        with grpcclient.InferenceServerClient(mesh.addresses[port]) as client:
            for what, (model, inputs, words) in model_side.items():
                code, message = answers[port, what] = refusal(client, model, inputs)
                assert code == "StatusCode.INVALID_ARGUMENT" and words in message, (port, what, message)
            code, message = answers[port, "unknown model"] = refusal(client, "no_such_model", int64_inputs((1, 4)))
            assert code == "StatusCode.NOT_FOUND", (port, message)
            assert message.startswith("Request for unknown model: 'no_such_model' is not found ("), message
            code, message = answers[port, "unknown version"] = refusal(client, "minilm", int64_inputs((1, 4)), "77")
            assert code == "StatusCode.NOT_FOUND"
            assert message.startswith("Request for unknown model: 'minilm' version 77 is not found ("), message
            code, message = answers[port, "huge name"] = refusal(client, huge_name, int64_inputs((1, 4)))
            assert code == "StatusCode.NOT_FOUND" and len(message.encode()) <= 1024, (code, len(message))
            assert message.startswith("Request for unknown model: 'mmm") and message.endswith("more bytes cut)")
    for what in (*model_side, "unknown model", "unknown version", "huge name"):
        assert answers["router", what] == answers["router_oip_fast", what], what


def test_request_bytes_that_do_not_parse_are_invalid_argument_on_every_service(mesh):
    import grpc

    undecodable = b"\x0a\x05\xff\xfe\xfd\xfc\xfb"  # field 1 (a string everywhere here) with invalid UTF-8
    calls = {
        "router": [
            "/maas.v1.Router/Embed",
            "/maas.v1.Router/Classify",
            "/maas.v1.Router/Infer",
            "/inference.GRPCInferenceService/ModelMetadata",
            "/grpc.health.v1.Health/Check",
        ],
        "tokenizer": ["/maas.v1.Tokenizer/Tokenize", "/grpc.health.v1.Health/Check"],
        "vision": ["/maas.v1.Vision/Preprocess"],
        "registry": ["/maas.v1.Registry/GetVersion", "/maas.v1.Registry/GetModel"],
    }
    for service, methods in calls.items():
        with grpc.insecure_channel(mesh.addresses[service]) as channel:
            for method in methods:
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(method)(undecodable, timeout=TIMEOUT)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (service, method, caught.value)
    with grpc.insecure_channel(mesh.addresses["registry"]) as channel:  # a stream, mid-way: no INTERNAL
        upload = channel.stream_unary("/maas.v1.Registry/RegisterVersion")
        with pytest.raises(grpc.RpcError) as caught:
            upload(iter([undecodable]), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
