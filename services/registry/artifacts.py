"""Receiving and validating uploaded artefacts before they can become visible.

An upload is streamed into a staging folder inside its model's folder in the repository (same
filesystem, so the final step is one atomic rename; repository.py says why there). The digest and
size are checked as bytes arrive; the artefact is then
validated with the format's own tooling (ONNX checker, torch.jit.load on CPU, Triton config parser)
in a worker thread, and the signature is read from it where possible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from services.registry.domain import (
    ArtifactFormat,
    PostprocessingKind,
    PreprocessingKind,
    RegistrationRequest,
    Signature,
    TensorSpec,
    check_name,
)
from services.registry.tritonconfig import generation_config
from services.shared import generation
from services.shared.config import ConfigError
from services.shared.errors import InvalidArgument
from services.shared.model_repository import read_model_config

SHA256_RE = re.compile(r"[0-9a-f]{64}")
# The file each backend loads from a version folder (default_model_filename).
MODEL_FILES = {ArtifactFormat.ONNX: "model.onnx", ArtifactFormat.TORCHSCRIPT: "model.pt"}
# Triton datatypes a signature may use.
DATATYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "BF16",
    "FP32",
    "FP64",
    "BYTES",
}
# TorchScript tensors are matched to forward() arguments by position, as LibTorch's backend does.
TORCHSCRIPT_TENSOR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*__\d+")
TENSOR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}")
MAX_LABELS = 100_000
MAX_TAGS = 64


def check_request(req: RegistrationRequest, max_bytes: int) -> None:
    """Everything about a header that can be refused before any byte is stored."""
    check_name(req.model)
    if not SHA256_RE.fullmatch(req.sha256):
        raise InvalidArgument(f"sha256 {req.sha256[:80]!r} is not 64 lower-case hex digits")
    if req.size_bytes <= 0:
        raise InvalidArgument("size_bytes must be the artefact's size, got 0")
    if req.size_bytes > max_bytes:
        raise InvalidArgument(f"artefact is {req.size_bytes} bytes, over the registry's limit of {max_bytes} bytes")
    if req.format == ArtifactFormat.TORCHSCRIPT and not req.signature:
        raise InvalidArgument("a TorchScript version needs its signature in the header (inputs and outputs)")
    check_signature(req.signature, torchscript=req.format == ArtifactFormat.TORCHSCRIPT)
    if req.preprocessing.kind != PreprocessingKind.NONE and not req.preprocessing.name:
        raise InvalidArgument(
            f"preprocessing {req.preprocessing.kind.value} needs the name of the {req.preprocessing.kind.value} spec"
        )
    if req.preprocessing.name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", req.preprocessing.name):
        raise InvalidArgument(f"preprocessing name {req.preprocessing.name[:80]!r} is invalid")
    if req.format == ArtifactFormat.ORT_GENAI:
        if req.preprocessing.kind != PreprocessingKind.TOKENIZER:
            raise InvalidArgument(
                "an ORT_GENAI (generation) version needs preprocessing tokenizer with the "
                "tokenizer's name (its prompts are tokenized and its ids detokenized there)"
            )
        if req.postprocessing.kind not in (PostprocessingKind.NONE, PostprocessingKind.GENERATION):
            raise InvalidArgument(
                f"postprocessing {req.postprocessing.kind.value} does not fit an ORT_GENAI "
                f"(generation) version; leave it empty or use generation"
            )
        if req.signature:
            raise InvalidArgument("an ORT_GENAI version takes no signature: it is the generation contract's")
    elif req.postprocessing.kind == PostprocessingKind.GENERATION:
        raise InvalidArgument(f"postprocessing generation needs an ORT_GENAI artefact, not {req.format.value}")
    if req.postprocessing.kind == PostprocessingKind.SOFTMAX_TOP_K and req.postprocessing.top_k > 1000:
        raise InvalidArgument(f"postprocessing top_k {req.postprocessing.top_k} is over 1000")
    if len(req.labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(req.labels)} labels, at most {MAX_LABELS}")
    if any("\n" in label or "\r" in label for label in req.labels):
        raise InvalidArgument("a label contains a line break")
    if len(req.tags) > MAX_TAGS or any(len(k) > 128 or len(v) > 1024 for k, v in req.tags.items()):
        raise InvalidArgument(f"tags: at most {MAX_TAGS}, keys ≤ 128 and values ≤ 1024 characters")
    if req.max_batch_size > 1024:
        raise InvalidArgument(f"max_batch_size {req.max_batch_size} is over 1024")


def check_signature(sig: Signature, torchscript: bool = False) -> None:
    for side, specs in (("input", sig.inputs), ("output", sig.outputs)):
        seen = set()
        for t in specs:
            if not TENSOR_NAME_RE.fullmatch(t.name):
                raise InvalidArgument(f"{side} name {t.name[:80]!r} is invalid")
            if t.name in seen:
                raise InvalidArgument(f"{side} {t.name!r} appears twice")
            seen.add(t.name)
            if t.datatype not in DATATYPES:
                raise InvalidArgument(f"{side} {t.name!r}: datatype {t.datatype!r} is not one of {sorted(DATATYPES)}")
            if any(d < -1 or d == 0 for d in t.shape):
                raise InvalidArgument(
                    f"{side} {t.name!r}: shape {list(t.shape)} has a dimension below 1 (-1 = dynamic)"
                )
            if torchscript and not TORCHSCRIPT_TENSOR_RE.fullmatch(t.name):
                raise InvalidArgument(
                    f"{side} {t.name!r}: TorchScript tensors are matched by position and must be "
                    f"named <name>__<index>, e.g. INPUT__0 / OUTPUT__0"
                )
    if sig and (not sig.inputs or not sig.outputs):
        raise InvalidArgument("a signature needs at least one input and one output")


class Upload:
    """Receives the artefact bytes into <staging>/artifact, checking size and digest as they arrive."""

    def __init__(self, staging: Path, req: RegistrationRequest):
        self.staging = staging
        self.req = req
        self.path = staging / "artifact"
        self._file = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.received = 0

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.req.size_bytes:
            raise InvalidArgument(f"received more than the declared size_bytes {self.req.size_bytes}")
        self._sha.update(chunk)
        self._file.write(chunk)

    def finish(self) -> None:
        """Close and fsync; refuse a short upload or a digest mismatch."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self.received != self.req.size_bytes:
            raise InvalidArgument(f"upload ended after {self.received} of {self.req.size_bytes} declared bytes")
        digest = self._sha.hexdigest()
        if digest != self.req.sha256:
            raise InvalidArgument(f"sha256 mismatch: header says {self.req.sha256}, received bytes hash to {digest}")

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.staging, ignore_errors=True)


@dataclass(frozen=True)
class ValidatedArtifact:
    """A checked artefact laid out as a Triton version folder (staging/version/...)."""

    version_dir: Path
    signature: Signature
    max_batch_size: int  # effective value; 0 = the model takes no batch dimension
    base_config: str = ""  # TRITON_FOLDER: the uploaded config as JSON


# -- ONNX -------------------------------------------------------------------------------------------


def _onnx_datatype(elem_type: int) -> str:
    import onnx

    names = {
        onnx.TensorProto.FLOAT: "FP32",
        onnx.TensorProto.FLOAT16: "FP16",
        onnx.TensorProto.DOUBLE: "FP64",
        onnx.TensorProto.BFLOAT16: "BF16",
        onnx.TensorProto.INT8: "INT8",
        onnx.TensorProto.INT16: "INT16",
        onnx.TensorProto.INT32: "INT32",
        onnx.TensorProto.INT64: "INT64",
        onnx.TensorProto.UINT8: "UINT8",
        onnx.TensorProto.UINT16: "UINT16",
        onnx.TensorProto.UINT32: "UINT32",
        onnx.TensorProto.UINT64: "UINT64",
        onnx.TensorProto.BOOL: "BOOL",
        onnx.TensorProto.STRING: "BYTES",
    }
    if elem_type not in names:
        raise InvalidArgument(f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} is not supported")
    return names[elem_type]


def onnx_signature(path: Path) -> tuple[Signature, bool]:
    """(signature without the batch dimension, batched?) read from the graph.

    The model is batched when every input and output has a symbolic (dynamic) first dimension.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def dims(value) -> list[int]:
        tt = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise InvalidArgument(f"ONNX tensor {value.name!r} has no tensor shape")
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim]

    inputs = [v for v in model.graph.input if v.name not in initializers]
    outputs = list(model.graph.output)
    shapes = {id(v): dims(v) for v in inputs + outputs}
    batched = all(shapes[id(v)] and shapes[id(v)][0] == -1 for v in inputs + outputs)

    def spec(v) -> TensorSpec:
        d = shapes[id(v)]
        return TensorSpec(v.name, _onnx_datatype(v.type.tensor_type.elem_type), tuple(d[1:] if batched else d))

    return Signature(tuple(map(spec, inputs)), tuple(map(spec, outputs))), batched


def check_onnx(path: Path) -> tuple[Signature, bool]:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types; all mean "invalid"
        raise InvalidArgument(f"ONNX checker rejected the model: {str(exc).strip()[:1000]}") from None
    return onnx_signature(path)


def check_torchscript(path: Path) -> None:
    """torch.jit.load where torch is installed (the dev venv). The services image has no torch (~800 MB
    for this one check), so there the archive's layout is checked and Triton's load, which a version
    passes before it is READY, is the full check."""
    try:
        import torch
    except ImportError:
        check_torchscript_archive(path)
        return
    try:
        torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"not a loadable TorchScript file: {str(exc).strip().splitlines()[0][:500]}") from None


def check_torchscript_archive(path: Path) -> None:
    """A TorchScript file is a zip of one folder holding data.pkl, constants.pkl and code/."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidArgument(f"not a loadable TorchScript file: not a TorchScript archive ({exc})") from None
    roots = {n.split("/", 1)[0] for n in names}
    if (
        len(roots) != 1
        or not {f"{next(iter(roots))}/{f}" for f in ("data.pkl", "constants.pkl")} <= set(names)
        or not any(n.startswith(f"{next(iter(roots))}/code/") for n in names)
    ):
        raise InvalidArgument("not a loadable TorchScript file: the archive lacks data.pkl, constants.pkl or code/")


# -- Triton folder ----------------------------------------------------------------------------------


def _triton_datatype(config_type: str) -> str:
    name = config_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _unpack(archive: Path, dest: Path, max_bytes: int, what: str) -> None:
    """Safely unpack a .tar or .tar.gz: files and folders only, nothing outside dest, within max_bytes."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            total = 0
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise InvalidArgument(f"archive member {m.name!r}: only files and folders are allowed")
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts:
                    raise InvalidArgument(f"archive member {m.name!r} points outside the folder")
                total += m.size
                if total > max_bytes:
                    raise InvalidArgument(f"archive unpacks to more than the limit of {max_bytes} bytes")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidArgument(f"not a readable .tar(.gz) {what}: {exc}") from None


def _extract_folder(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Safely unpack a .tar.gz of one Triton model folder; returns the folder holding config.pbtxt."""
    _unpack(archive, dest, max_bytes, "Triton model folder")
    configs = [p.parent for p in dest.rglob("config.pbtxt")]
    if len(configs) != 1:
        raise InvalidArgument(f"the archive must hold exactly one config.pbtxt, found {len(configs)}")
    return configs[0]


def check_triton_folder(archive: Path, work: Path, max_bytes: int) -> ValidatedArtifact:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    root = _extract_folder(archive, work / "unpacked", max_bytes)
    try:
        config = read_model_config(root / "config.pbtxt")  # strict: an unknown field is a typo here
    except ConfigError as exc:
        raise InvalidArgument(str(exc)) from None
    versions = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    if len(versions) != 1:
        raise InvalidArgument(f"the folder must hold exactly one numbered version folder, found {len(versions)}")
    backend = config.backend or {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}.get(config.platform)
    if backend not in ("onnxruntime", "pytorch"):
        raise InvalidArgument(
            f"backend {config.backend or config.platform!r} is not served here; use onnxruntime or pytorch"
        )
    fmt = ArtifactFormat.ONNX if backend == "onnxruntime" else ArtifactFormat.TORCHSCRIPT
    model_file = versions[0] / (config.default_model_filename or MODEL_FILES[fmt])
    if not model_file.is_file():
        raise InvalidArgument(f"version folder {versions[0].name} has no {model_file.name}")
    if fmt == ArtifactFormat.ONNX:
        check_onnx(model_file)
    else:
        check_torchscript(model_file)
    spec = lambda t: TensorSpec(
        t.name, _triton_datatype(model_config_pb2.DataType.Name(t.data_type)), tuple(int(d) for d in t.dims)
    )
    signature = Signature(tuple(map(spec, config.input)), tuple(map(spec, config.output)))
    check_signature(signature, torchscript=fmt == ArtifactFormat.TORCHSCRIPT)
    config.ClearField("version_policy")
    config.ClearField("name")
    return ValidatedArtifact(
        versions[0], signature, int(config.max_batch_size), json.dumps(json_format.MessageToDict(config))
    )


# -- ONNX Runtime GenAI folder -------------------------------------------------------------------


def check_genai_dir(folder: Path) -> int:
    """An ONNX Runtime GenAI model folder: genai_config.json names a decoder ONNX file that is there and
    takes input_ids. Returns the model's context length. (The weights are not loaded: Triton's load
    and the warm-up generation prove they work.)"""
    import onnx

    try:
        config = json.loads((folder / generation.GENAI_CONFIG).read_text())
        model = config["model"]
        context = int(model["context_length"])
        int(model["vocab_size"])
        filename = str(model["decoder"]["filename"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            f"{generation.GENAI_CONFIG} is unreadable or lacks model.context_length, "
            f"model.vocab_size or model.decoder.filename: {exc!r}"
        ) from None
    if context <= 0:
        raise InvalidArgument(f"{generation.GENAI_CONFIG}: model.context_length {context} must be positive")
    decoder = folder / filename
    if Path(filename).is_absolute() or ".." in Path(filename).parts or not decoder.is_file():
        raise InvalidArgument(f"{generation.GENAI_CONFIG} names decoder {filename!r}, which is not in the folder")
    try:
        graph = onnx.load(str(decoder), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; all mean "not an ONNX file"
        raise InvalidArgument(f"decoder {filename!r} is not an ONNX model: {str(exc)[:300]}") from None
    if "input_ids" not in {i.name for i in graph.input}:
        raise InvalidArgument(f"decoder {filename!r} has no input_ids input: not a causal language model")
    return context


def check_genai_folder(archive: Path, work: Path, max_bytes: int) -> ValidatedArtifact:
    root = work / "unpacked"
    _unpack(archive, root, max_bytes, "ONNX Runtime GenAI folder")
    found = [p.parent for p in root.rglob(generation.GENAI_CONFIG)]
    if len(found) != 1:
        raise InvalidArgument(f"the archive must hold exactly one {generation.GENAI_CONFIG}, found {len(found)}")
    context = check_genai_dir(found[0])
    signature = Signature(
        tuple(TensorSpec(n, dt, dims) for n, dt, dims, _ in generation.INPUTS),
        tuple(TensorSpec(n, dt, dims) for n, dt, dims in generation.OUTPUTS),
    )
    return ValidatedArtifact(found[0], signature, 0, generation_config(context))


# -- entry point ------------------------------------------------------------------------------------


def validate(upload: Upload, default_max_batch_size: int, max_bytes: int) -> ValidatedArtifact:
    """Check the received artefact and lay it out as staging/version/<model file>. Runs in a thread."""
    req = upload.req
    version_dir = upload.staging / "version"
    if req.format == ArtifactFormat.ORT_GENAI:
        art = check_genai_folder(upload.path, upload.staging, max_bytes)
        art.version_dir.rename(version_dir)
        return ValidatedArtifact(version_dir, art.signature, 0, art.base_config)
    if req.format == ArtifactFormat.TRITON_FOLDER:
        art = check_triton_folder(upload.path, upload.staging, max_bytes)
        if req.signature and (diff := req.signature.differences(art.signature)):
            raise InvalidArgument(f"header signature disagrees with config.pbtxt: {'; '.join(diff)}")
        art.version_dir.rename(version_dir)
        return ValidatedArtifact(version_dir, art.signature, art.max_batch_size, art.base_config)
    if req.format == ArtifactFormat.ONNX:
        signature, batched = check_onnx(upload.path)
        if req.signature and (diff := req.signature.differences(signature)):
            raise InvalidArgument(f"header signature disagrees with the ONNX graph: {'; '.join(diff)}")
        check_signature(signature)
        max_batch = (req.max_batch_size or default_max_batch_size) if batched else 0
    else:
        check_torchscript(upload.path)
        signature, max_batch = req.signature, req.max_batch_size or default_max_batch_size
    version_dir.mkdir()
    upload.path.rename(version_dir / MODEL_FILES[req.format])
    return ValidatedArtifact(version_dir, signature, max_batch)


def check_metadata_against(signature: Signature, req: RegistrationRequest) -> None:
    """Post-processing and labels must fit the signature they will run on."""
    outputs = {t.name: t for t in signature.outputs}
    post = req.postprocessing
    if post.output and post.output not in outputs:
        raise InvalidArgument(
            f"postprocessing output {post.output!r} is not an output of the model ({sorted(outputs)})"
        )
    if req.labels:
        target = outputs.get(post.output) if post.output else signature.outputs[0]
        classes = target.shape[-1] if target.shape else -1
        if classes != -1 and classes != len(req.labels):
            raise InvalidArgument(f"{len(req.labels)} labels for output {target.name!r} with {classes} classes")
