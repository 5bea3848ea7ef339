"""Inputs the version's signature rules out are refused by the router before Triton sees them
(real mesh, real Triton: its statistics for the model do not move), on every router API."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.shared.tensors import to_proto

VOCAB = 30522  # minilm's tokenizer (the router asks the tokenizer service)
TIMEOUT = 30


def triton_counts(direct: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """(successful, failed) inferences Triton has counted for the model, all versions."""
    stats = direct.get_inference_statistics(model, as_json=True)["model_stats"]
    count = lambda kind: sum(int(s.get("inference_stats", {}).get(kind, {}).get("count", 0)) for s in stats)
    return count("success"), count("fail")


def minilm(ids, names=("input_ids", "attention_mask", "token_type_ids"), datatype="INT64"):
    ids = np.asarray(ids)
    inputs = []
    for name in names:
        array = (ids if name == "input_ids" else np.ones_like(ids)).astype(
            np.int64 if datatype == "INT64" else np.int32
        )
        inputs.append(grpcclient.InferInput(name, list(array.shape), datatype))
        inputs[-1].set_data_from_numpy(array)
    return inputs


# (inputs, words of the refusal): each one a request Triton would refuse or fail to execute.
HOSTILE = {
    "id past the vocabulary": (
        lambda: minilm([[101, VOCAB + 7, 102]]),
        f"token id {VOCAB + 7} at flat index 1 is outside the vocabulary [0, {VOCAB})",
    ),
    "negative id": (lambda: minilm([[101, -5, 102]]), "token id -5 at flat index 1"),
    "batch over max_batch_size": (
        lambda: minilm(np.full((33, 4), 101)),
        "inference request batch-size must be <= 32 for 'minilm'",
    ),
    "unknown input": (
        lambda: minilm([[101, 102]], names=("input_ids", "attention_mask", "token_type_ids", "x")),
        "unexpected inference input 'x' for model 'minilm'",
    ),
    "missing input": (
        lambda: minilm([[101, 102]], names=("input_ids", "attention_mask")),
        "missing required input(s) ['token_type_ids']",
    ),
    "wrong datatype": (
        lambda: minilm([[101, 102]], datatype="INT32"),
        "inference input 'input_ids' data-type is 'INT32', but model 'minilm' expects 'INT64'",
    ),
    "wrong rank": (
        lambda: minilm([101, 102]),
        "unexpected shape for input 'input_ids' for model 'minilm'. Expected [-1,-1], got [2]",
    ),
}


@pytest.fixture(scope="module")
def direct(mesh):
    with grpcclient.InferenceServerClient(mesh.addresses["triton"]) as client:
        yield client


def settled_counts(direct, model: str) -> tuple[int, int]:
    """Triton's counts once two readings agree (a backend counts a batch after answering it)."""
    last = triton_counts(direct, model)
    while True:
        time.sleep(0.2)
        now = triton_counts(direct, model)
        if now == last:
            return now
        last = now


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_oip_requests_outside_the_signature_never_reach_triton(mesh, direct, case):
    inputs, words = HOSTILE[case]
    before = settled_counts(direct, "minilm")
    with grpcclient.InferenceServerClient(mesh.addresses["router"]) as routed:
        with pytest.raises(InferenceServerException) as caught:
            routed.infer("minilm", inputs(), client_timeout=TIMEOUT)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
        assert words in caught.value.message()
        # A valid call after them is counted: the counts read are live, and the bad ones added nothing.
        routed.infer("minilm", minilm([[101, 7592, 102]]), client_timeout=TIMEOUT)
    success, failed = before
    deadline = time.monotonic() + TIMEOUT
    while triton_counts(direct, "minilm")[0] < success + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert settled_counts(direct, "minilm") == (success + 1, failed)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_fast_path_answers_as_the_main_port(mesh, direct, case):
    """The compiled OIP port forwards bytes unparsed: a tokenizer-fed model's calls (token ids only the
    router checks; ONNX Runtime takes a negative id as counted from the end) go to the main port."""
    inputs, words = HOSTILE[case]
    before = settled_counts(direct, "minilm")
    with grpcclient.InferenceServerClient(mesh.addresses["router_oip_fast"]) as fast:
        with pytest.raises(InferenceServerException) as caught:
            fast.infer("minilm", inputs(), client_timeout=TIMEOUT)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    assert words in caught.value.message()
    assert settled_counts(direct, "minilm") == before


def test_on_the_fast_path_triton_checks_with_the_words_the_router_uses(mesh, direct):
    """efficientnet stays on the compiled path (Triton checks all its limits): same code, and the words
    the router's own check uses are Triton's."""
    image = np.zeros((17, 3, 224, 224), np.float32)
    for port in ("router", "router_oip_fast"):
        with grpcclient.InferenceServerClient(mesh.addresses[port]) as client:
            inp = grpcclient.InferInput("INPUT__0", list(image.shape), "FP32")
            inp.set_data_from_numpy(image)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("efficientnet_lite0", [inp], client_timeout=TIMEOUT)
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", (port, caught.value)
            assert "inference request batch-size must be <= 16 for 'efficientnet_lite0'" in caught.value.message()


def test_maas_infer_checks_a_callers_tensors_before_triton(mesh, direct):
    before = settled_counts(direct, "minilm")
    ids = np.array([[101, VOCAB, 102]], np.int64)
    good = [to_proto("attention_mask", np.ones_like(ids)), to_proto("token_type_ids", np.zeros_like(ids))]
    cases = {
        "outside the vocabulary [0, 30522)": [to_proto("input_ids", ids), *good],
        "unexpected shape for input 'input_ids'": [to_proto("input_ids", ids[0]), *good],
        "input byte size mismatch for input 'input_ids' for model 'minilm'. Expected 24, got 16": [
            tensor_pb2.Tensor(name="input_ids", datatype="INT64", shape=[1, 3], raw_contents=b"\0" * 16),
            *good,
        ],
    }
    with grpc.insecure_channel(mesh.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for words, tensors in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.Infer(
                    router_pb2.InferRequest(model=tensor_pb2.ModelRef(name="minilm"), inputs=tensors), timeout=TIMEOUT
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert words in caught.value.details()
    assert settled_counts(direct, "minilm") == before
