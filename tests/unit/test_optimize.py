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
    Version,
    VersionState,
)
from services.registry.optimize import check_source, chosen, pack
from services.shared.errors import FailedPrecondition, InvalidArgument


def version(fmt: ArtifactFormat, post: PostprocessingKind) -> Version:
    return Version(
        "m",
        1,
        VersionState.READY,
        fmt,
        "0" * 64,
        1,
        Signature(),
        Preprocessing(PreprocessingKind.NONE),
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
