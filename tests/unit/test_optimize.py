"""optimize's choices and refusals (services/registry/optimize.py): exactly one optimisation, and each
only on the kind of version it applies to, the field named."""

from __future__ import annotations

import json

import pytest

from services.registry.domain import (
    ArtifactFormat,
    Postprocessing,
    PostprocessingKind,
    Preprocessing,
    PreprocessingKind,
    Signature,
    TensorSpec,
    Version,
    VersionState,
)
from services.registry.optimize import calibration_inputs, check_source, chosen, leading_nodes, pack
from services.shared.errors import FailedPrecondition, InvalidArgument


def version(
    fmt: ArtifactFormat,
    post: PostprocessingKind,
    pre: PreprocessingKind = PreprocessingKind.NONE,
    signature: Signature = Signature(),
) -> Version:
    return Version(
        "m",
        1,
        VersionState.READY,
        fmt,
        "0" * 64,
        1,
        signature,
        Preprocessing(pre),
        Postprocessing(post),
        (),
        {},
        0.0,
        "t",
        "",
        0,
    )


def test_exactly_one_optimisation():
    assert [chosen(True, False), chosen(False, True), chosen(False, False, True)] == ["int8", "fp16", "int4"]
    with pytest.raises(InvalidArgument, match="int8, fp16, int4: choose an optimisation"):
        chosen(False, False)
    with pytest.raises(InvalidArgument, match="int8, fp16: choose one"):
        chosen(True, True)


@pytest.mark.parametrize(
    "fmt, post, optimization, ok",
    [
        (ArtifactFormat.ONNX, PostprocessingKind.EMBEDDING, "int8", True),
        (ArtifactFormat.ONNX, PostprocessingKind.EMBEDDING, "fp16", True),
        (ArtifactFormat.ONNX, PostprocessingKind.EMBEDDING, "int4", False),
        (ArtifactFormat.TORCHSCRIPT, PostprocessingKind.SOFTMAX_TOP_K, "int8", False),
        (ArtifactFormat.TORCHSCRIPT, PostprocessingKind.SOFTMAX_TOP_K, "fp16", False),
        (ArtifactFormat.ORT_GENAI, PostprocessingKind.GENERATION, "int8", False),
        (ArtifactFormat.ORT_GENAI, PostprocessingKind.GENERATION, "int4", True),
    ],
)
def test_each_optimisation_applies_to_its_kind(fmt, post, optimization, ok):
    source = version(fmt, post)
    if ok:
        check_source("m", 1, source, optimization)
        return
    with pytest.raises(FailedPrecondition, match="from_version") as caught:
        check_source("m", 1, source, optimization)
    if fmt == ArtifactFormat.ORT_GENAI:
        assert "--int4" in str(caught.value)


def test_pack_lays_the_folder_out_at_the_archive_root(tmp_path):
    import tarfile

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "genai_config.json").write_text(json.dumps({}))
    (folder / "model.onnx").write_bytes(b"x")
    pack(folder, tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert sorted(tar.getnames()) == ["genai_config.json", "model.onnx"]


IMAGE = Signature((TensorSpec("INPUT__0", "FP32", (3, 8, 8)),), (TensorSpec("OUTPUT__0", "FP32", (10,)),))


def npy(array) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_an_image_classifier_int8_needs_calibration_and_only_int8_takes_it():
    image = version(ArtifactFormat.ONNX, PostprocessingKind.SOFTMAX_TOP_K, PreprocessingKind.VISION, IMAGE)
    with pytest.raises(FailedPrecondition, match="calibration: .*--calibration"):
        check_source("m", 1, image, "int8")
    check_source("m", 1, image, "int8", calibrated=True)
    check_source("m", 1, image, "fp16")  # fp16 needs no calibration
    with pytest.raises(InvalidArgument, match="calibration: only --int8"):
        check_source("m", 1, image, "fp16", calibrated=True)
    torchscript = version(ArtifactFormat.TORCHSCRIPT, PostprocessingKind.SOFTMAX_TOP_K, PreprocessingKind.VISION)
    with pytest.raises(FailedPrecondition, match="from_version: .*ONNX export"):
        check_source("m", 1, torchscript, "int8", calibrated=True)


def test_calibration_inputs_must_fit_the_input():
    import numpy as np

    image = version(ArtifactFormat.ONNX, PostprocessingKind.SOFTMAX_TOP_K, PreprocessingKind.VISION, IMAGE)
    good = np.zeros((2, 3, 8, 8), np.float32)
    assert calibration_inputs(npy(good), image, 1).shape == (2, 3, 8, 8)
    for bad, message in (
        (b"not numpy", "not a NumPy .npy"),
        (npy(good.astype(np.float64)), "float64 inputs; input 'INPUT__0' takes FP32"),
        (npy(np.zeros((2, 3, 8, 9), np.float32)), r"items of shape \[3, 8, 9\]; input 'INPUT__0' takes \[3, 8, 8\]"),
        (npy(np.zeros((3, 8, 8), np.float32)), "items of shape"),
        (npy(np.zeros((0, 3, 8, 8), np.float32)), "0 items"),
    ):
        with pytest.raises(InvalidArgument, match=f"calibration: {message}"):
            calibration_inputs(bad, image, 1)
    two = Signature(IMAGE.inputs * 2, IMAGE.outputs)
    with pytest.raises(FailedPrecondition, match="calibration: .* 2 inputs"):
        calibration_inputs(npy(good), version(ArtifactFormat.ONNX, PostprocessingKind.NONE, signature=two), 1)


def test_leading_nodes_stop_at_the_nth_convolution():
    from onnx import helper

    ops = ["Conv", "Clip", "Conv", "Conv", "Clip", "Conv", "Add"]
    graph = helper.make_graph(
        [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i, op in enumerate(ops)], "g", [], []
    )
    assert leading_nodes(graph, 3) == ["n0", "n1", "n2", "n3"]
    assert leading_nodes(graph, 0) == []
