"""Generation versions in the registry: the ORT_GENAI folder format, its checks and its Triton config."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from google.protobuf import json_format

from maas.registry_client import detect_format, pack_folder
from services.registry import artifacts
from services.registry.domain import (
    ArtifactFormat,
    Postprocessing,
    PostprocessingKind,
    Preprocessing,
    PreprocessingKind,
    RegistrationRequest,
)
from services.registry.tritonconfig import model_config
from services.shared import generation
from services.shared.errors import InvalidArgument
from tests.fixtures.registry import tiny_onnx
from tests.unit.test_registry_parts import upload, version

TOKENIZER = Preprocessing(PreprocessingKind.TOKENIZER, "smollm2")


def genai_folder(root: Path, context: int = 4096, decoder: str = "model.onnx", input_name: str = "input_ids") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "genai_config.json").write_text(
        json.dumps(
            {"model": {"type": "llama", "context_length": context, "vocab_size": 100, "decoder": {"filename": decoder}}}
        )
    )
    (root / "model.onnx").write_bytes(tiny_onnx(input_name=input_name))
    (root / "tokenizer.json").write_text("{}")
    return root


def packed(folder: Path, tmp_path: Path) -> bytes:
    return pack_folder(folder, tmp_path / "g.tar", genai=True).read_bytes()


def test_genai_folder_becomes_a_decoupled_generation_version(tmp_path):
    folder = genai_folder(tmp_path / "src")
    assert detect_format(folder) == "genai"
    art = artifacts.validate(
        upload(tmp_path, packed(folder, tmp_path), ArtifactFormat.ORT_GENAI, preprocessing=TOKENIZER), 32, 10**9
    )
    assert sorted(p.name for p in art.version_dir.iterdir()) == ["genai_config.json", "model.onnx", "tokenizer.json"]
    assert art.max_batch_size == 0
    assert [t.name for t in art.signature.inputs] == [name for name, *_ in generation.INPUTS]
    # The config the registry writes for it: the contract on the onnxruntime_genai backend, decoupled.
    v = version(ArtifactFormat.ORT_GENAI, max_batch=0, sig=art.signature)
    v.base_config = art.base_config
    config = model_config("smollm2", v, [1, 2], with_labels=False)
    assert config.backend == "onnxruntime_genai" and config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0 and list(config.version_policy.specific.versions) == [1, 2]
    assert config.parameters["context_length"].string_value == "4096"
    assert int(config.parameters["max_tokens_cap"].string_value) == generation.DEFAULT_MAX_TOKENS_CAP
    optional = {t.name: t.optional for t in config.input}
    assert not optional["input_ids"] and all(optional[n] for n in optional if n != "input_ids")
    # The committed smollm2 config declares the same tensors.
    committed = Path(__file__).resolve().parents[2] / "model_repository" / "smollm2" / "config.pbtxt"
    from services.shared.model_repository import read_model_config

    ours = json_format.MessageToDict(config)
    theirs = json_format.MessageToDict(read_model_config(committed))
    assert ours["input"] == theirs["input"] and ours["output"] == theirs["output"]
    # ... and the same parameters, but the context length, which the registry reads from the export.
    del ours["parameters"]["context_length"]
    assert ours["parameters"] == theirs["parameters"]


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda root: (root / "genai_config.json").unlink(), "exactly one genai_config.json"),
        (lambda root: (root / "model.onnx").unlink(), "not in the folder"),
        (lambda root: (root / "model.onnx").write_bytes(b"not onnx"), "not an ONNX model"),
        (lambda root: (root / "model.onnx").write_bytes(tiny_onnx(input_name="x")), "input_ids"),
        (lambda root: (root / "genai_config.json").write_text('{"model": {}}'), "context_length"),
    ],
)
def test_bad_genai_folders_are_refused_naming_why(tmp_path, change, reason):
    folder = genai_folder(tmp_path / "src")
    change(folder)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add(folder, arcname=".")
    with pytest.raises(InvalidArgument, match=reason):
        artifacts.validate(
            upload(tmp_path, data.getvalue(), ArtifactFormat.ORT_GENAI, preprocessing=TOKENIZER), 32, 10**9
        )


def request(**kwargs) -> RegistrationRequest:
    return RegistrationRequest(
        model="smollm2", format=kwargs.pop("format", ArtifactFormat.ORT_GENAI), sha256="0" * 64, size_bytes=1, **kwargs
    )


def test_generation_header_rules():
    artifacts.check_request(request(preprocessing=TOKENIZER), 10)
    artifacts.check_request(
        request(preprocessing=TOKENIZER, postprocessing=Postprocessing(PostprocessingKind.GENERATION)), 10
    )
    with pytest.raises(InvalidArgument, match="preprocessing tokenizer"):
        artifacts.check_request(request(), 10)
    with pytest.raises(InvalidArgument, match="embedding"):
        artifacts.check_request(
            request(preprocessing=TOKENIZER, postprocessing=Postprocessing(PostprocessingKind.EMBEDDING)), 10
        )
    with pytest.raises(InvalidArgument, match="ORT_GENAI"):
        artifacts.check_request(
            request(format=ArtifactFormat.ONNX, postprocessing=Postprocessing(PostprocessingKind.GENERATION)), 10
        )
