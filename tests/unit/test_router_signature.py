"""The router's input check against a version's signature (services/router/signature.py), pure."""

from __future__ import annotations

import numpy as np
import pytest

from services.router.routing import TensorInfo, VersionInfo
from services.router.signature import Given, Limits, check, declared_limit
from services.shared.errors import InvalidArgument

MINILM = VersionInfo(
    "minilm", 1, inputs=(TensorInfo("input_ids", "INT64", (-1,)), TensorInfo("attention_mask", "INT64", (-1,)))
)
LIMITS = Limits(max_batch_size=32, has_batch_dim=True, max_sequence_length=512, vocab_size=30522)


def ids(array, name="input_ids", datatype="INT64"):
    array = np.asarray(array, dtype=np.int64 if datatype == "INT64" else np.int32)
    return Given(name, datatype, array.shape, array.tobytes())


def refused(inputs, limits=LIMITS) -> str:
    with pytest.raises(InvalidArgument) as caught:
        check(MINILM, inputs, limits)
    return str(caught.value)


def test_a_request_within_the_signature_passes():
    check(MINILM, [ids([[101, 102]]), ids([[1, 1]], "attention_mask")], LIMITS)


@pytest.mark.parametrize(
    "inputs, words",
    [
        ([ids([[1]]), ids([[1]], "attention_mask"), ids([[1]], "extra")], "unexpected inference input 'extra'"),
        ([ids([[1]])], "missing required input(s) ['attention_mask']"),
        (
            [ids([[1]], datatype="INT32"), ids([[1]], "attention_mask")],
            "inference input 'input_ids' data-type is 'INT32', but model 'minilm' expects 'INT64'",
        ),
        (
            [ids([1, 2]), ids([[1, 1]], "attention_mask")],
            "unexpected shape for input 'input_ids' for model 'minilm'. Expected [-1,-1], got [2]",
        ),
        (
            [ids(np.ones((33, 2))), ids(np.ones((33, 2)), "attention_mask")],
            "inference request batch-size must be <= 32 for 'minilm'",
        ),
        (
            [ids(np.ones((1, 513))), ids(np.ones((1, 513)), "attention_mask")],
            "input 'input_ids' for model 'minilm': sequence length 513 exceeds the model's maximum of 512 positions",
        ),
        (
            [ids([[101, 30522]]), ids([[1, 1]], "attention_mask")],
            "token id 30522 at flat index 1 is outside the vocabulary [0, 30522)",
        ),
        ([ids([[-1]]), ids([[1]], "attention_mask")], "token id -1 at flat index 0"),
        (
            [Given("input_ids", "INT64", (1, 2), b"\0" * 8), ids([[1, 1]], "attention_mask")],
            "input byte size mismatch for input 'input_ids' for model 'minilm'. Expected 16, got 8",
        ),
    ],
)
def test_refusals_name_the_input_and_the_limit(inputs, words):
    assert words in refused(inputs)


def test_an_element_count_past_int64_does_not_wrap():
    inputs = [Given("input_ids", "INT64", (2**32, 2**32), b""), ids([[1]], "attention_mask")]
    assert f"Expected {2**64 * 8}, got 0" in refused(inputs, Limits())


def test_unknown_limits_are_not_checked_and_the_router_may_slice_batches():
    big = [ids(np.full((64, 600), 40000)), ids(np.ones((64, 600)), "attention_mask")]
    check(MINILM, big, Limits(max_batch_size=None, has_batch_dim=True))


def test_a_version_without_a_signature_is_left_to_triton():
    check(VersionInfo("m", 1), [Given("anything", "FP32", (1,), b"")], LIMITS)


@pytest.mark.parametrize("value, limit", [("512", 512), ("", 0), ("0", 0), ("-3", 0), ("١٢", 0), ("x", 0)])
def test_declared_limits_come_from_positive_ascii_tags(value, limit):
    assert declared_limit({"max_sequence_length": value}, "max_sequence_length") == limit
