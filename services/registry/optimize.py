"""Optimize, verify, promote: a new version made from a READY ONNX version, rolled out behind gates.

`int8`: ONNX Runtime's dynamic quantization (weights to int8 with per-channel scales, activations
quantized at run time: no calibration data needed), the usual choice for transformer encoders such as
minilm on CPUs; with calibration inputs (required for image classifiers, whose cost is convolutions)
static quantization instead (quantize_int8_static), activations int8 too with ranges measured on those
inputs. `fp16`: weights and compute to float16 with ONNX Runtime's converter
(onnxruntime.transformers.float16), inputs and outputs kept float32 so callers see the same signature;
half the size, and faster only where the hardware has fp16 arithmetic. `int4` (generation versions, ONNX
Runtime GenAI folders): the decoder's MatMul weights to 4 bits (MatMulNBits), the folder otherwise as it
is. The new version is registered like
an upload (same checks, a new number, tags `optimized_from` and `optimization`), waits until READY, then a
rollout against production starts with a shadow of every request and a `min_shadow_agreement` gate
(default OPTIMIZE_MIN_AGREEMENT): it is promoted only if the agreement, error and latency gates hold
(rollout.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from maas.rollout_defaults import OPTIMIZE_MIN_AGREEMENT
from services.registry.domain import (
    ArtifactFormat,
    PostprocessingKind,
    PreprocessingKind,
    RegistrationRequest,
    Version,
    VersionState,
    check_name,
)
from services.shared import generation
from services.shared.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    import numpy as np

    from services.registry.registry import Registry
    from services.registry.rollout import Rollout, RolloutPolicy

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass
class Optimized:
    version: Version
    size_before: int
    size_after: int
    rollout: "Rollout"


def quantize_int8(source: Path, dest: Path) -> None:
    """Dynamic int8 quantization of an ONNX file (CPU work: run it off the event loop)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:  # the registry image without the local extras
        raise FailedPrecondition(
            "optimize --int8 needs onnxruntime in the registry (pip install onnxruntime)"
        ) from None
    # Per-channel scales: minilm's embeddings keep a mean cosine of ~0.993 with fp32 (per-tensor: ~0.965).
    quantize_dynamic(str(source), str(dest), weight_type=QuantType.QInt8, per_channel=True)


# Static int8 of a CNN, chosen by measurement on efficientnet_lite0 (docs/rollouts.md has the table): QDQ,
# per-channel weights, MinMax activation ranges, and the graph up to its FLOAT_LEADING_CONVS-th Conv kept
# float (weights and activations): the stem and the first blocks run at the highest resolution, where int8
# error is amplified most by every layer after them, for a small share of the compute (efficientnet_lite0:
# stem and blocks 0-1, ~12 % of the multiply-adds). Entropy or percentile calibration, more calibration
# inputs, and keeping the depthwise, projection or most weight-sensitive convolutions float as well did not
# raise the agreement (or lowered it) and cost size or time.
FLOAT_LEADING_CONVS = 6
MAX_CALIBRATION_ITEMS = 512


def calibration_inputs(data: bytes, source: Version, from_version: int) -> "np.ndarray":
    """The request's .npy as a float32 batch for `source`'s one input; INVALID_ARGUMENT naming the field."""
    import numpy as np

    if len(source.signature.inputs) != 1:
        raise FailedPrecondition(
            f"calibration: version {from_version} of {source.model!r} has {len(source.signature.inputs)} "
            "inputs; calibration takes models with one"
        )
    spec = source.signature.inputs[0]
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidArgument(f"calibration: not a NumPy .npy file ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.float32 or spec.datatype != "FP32":
        found = getattr(array, "dtype", type(array).__name__)
        raise InvalidArgument(f"calibration: {found} inputs; input {spec.name!r} takes {spec.datatype} (float32)")
    item = array.shape[1:]
    if len(item) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, item)):
        raise InvalidArgument(
            f"calibration: items of shape {list(item)}; input {spec.name!r} takes {list(spec.shape)} (array shape "
            f"[N, *item])"
        )
    if not 1 <= len(array) <= MAX_CALIBRATION_ITEMS:
        raise InvalidArgument(f"calibration: {len(array)} items; give 1..{MAX_CALIBRATION_ITEMS}")
    return array


def quantize_int8_static(source: Path, dest: Path, inputs: "np.ndarray", input_name: str) -> None:
    """Static int8 of an ONNX file, activations calibrated on `inputs` (CPU work: off the event loop)."""
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise FailedPrecondition(
            "optimize --int8 with calibration needs onnx and onnxruntime in the registry (pip install onnx onnxruntime)"
        ) from None

    class Items(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(inputs[i : i + 1] for i in range(len(inputs)))

        def get_next(self):
            item = next(self._items, None)
            return None if item is None else {input_name: item}

    with tempfile.TemporaryDirectory(prefix="maas-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and graph optimised, as ONNX Runtime advises
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(dest),
            Items(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=leading_nodes(onnx.load(str(prepared)).graph, FLOAT_LEADING_CONVS),
        )


def leading_nodes(graph, convs: int) -> list[str]:
    """Names of the nodes up to the `convs`-th Conv (ONNX graphs are topologically sorted)."""
    names, seen = [], 0
    for node in graph.node:
        if seen == convs:
            break
        names.append(node.name)
        seen += node.op_type == "Conv"
    return names


def convert_fp16(source: Path, dest: Path) -> None:
    """Float16 weights and compute, float32 inputs and outputs (CPU work: run it off the event loop)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise FailedPrecondition(
            "optimize --fp16 needs onnx and onnxruntime in the registry (pip install onnx onnxruntime)"
        ) from None
    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(dest))


# Optimisation name -> (what it does to an ONNX file, how the version's description says it).
OPTIMIZATIONS = {
    "int8": (quantize_int8, "int8 (dynamic quantization)"),
    "fp16": (convert_fp16, "fp16 (float16 weights, float32 inputs and outputs)"),
}


# Generation (ORT_GENAI folders): 4-bit weights of every MatMul (ONNX Runtime's MatMulNBits), blocks of
# 32 with a zero point. Asymmetric: on smollm2 the symmetric variant lost the answer to "The capital of
# France is" (greedy), the asymmetric one keeps it; embeddings (Gather) stay float32.
INT4_BLOCK_SIZE = 32


def quantize_int4(source_dir: Path, dest_dir: Path) -> None:
    """An ONNX Runtime GenAI folder with its decoder's MatMul weights in int4 (CPU work: off the event
    loop); the other files (genai_config.json, tokenizer, chat template) are copied as they are."""
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise FailedPrecondition(
            "optimize --int4 needs onnx and onnxruntime in the registry (pip install onnx onnxruntime)"
        ) from None
    decoder = json.loads((source_dir / generation.GENAI_CONFIG).read_text())["model"]["decoder"]["filename"]
    dest_dir.mkdir(parents=True, exist_ok=True)
    for item in source_dir.iterdir():
        if item.is_file() and not item.name.startswith(decoder):  # the decoder and its external data
            shutil.copy2(item, dest_dir / item.name)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source_dir / decoder)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=False
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dest_dir / decoder), use_external_data_format=True)


def pack(folder: Path, archive: Path) -> None:
    """The folder as the tar archive an ORT_GENAI upload is."""
    with tarfile.open(archive, "w") as tar:
        for item in sorted(folder.iterdir()):
            tar.add(item, arcname=item.name)


def chosen(int8: bool, fp16: bool, int4: bool = False) -> str:
    """The one optimisation asked for; INVALID_ARGUMENT naming the fields otherwise."""
    picked = [name for name, on in (("int8", int8), ("fp16", fp16), ("int4", int4)) if on]
    if not picked:
        raise InvalidArgument("int8, fp16, int4: choose an optimisation (--int8, --fp16 or --int4)")
    if len(picked) > 1:
        raise InvalidArgument(f"{', '.join(picked)}: choose one optimisation, not {len(picked)}")
    return picked[0]


def check_source(model: str, from_version: int, source: Version, optimization: str, calibrated: bool = False) -> None:
    """FAILED_PRECONDITION naming from_version when the optimisation does not apply to the version's kind
    (and calibration when an image classifier's int8 comes without it); INVALID_ARGUMENT for calibration
    given to an optimisation that takes none."""
    if calibrated and optimization != "int8":
        raise InvalidArgument(f"calibration: only --int8 takes calibration inputs, not --{optimization}")
    generation_model = source.postprocessing.kind == PostprocessingKind.GENERATION
    if optimization == "int4":
        if source.format != ArtifactFormat.ORT_GENAI or not generation_model:
            raise FailedPrecondition(
                f"from_version: version {from_version} of {model!r} is {source.format.value}; optimize --int4 "
                f"takes generation versions (ORT_GENAI folders); use --int8 or --fp16 for ONNX models"
            )
        return
    if source.format != ArtifactFormat.ONNX:
        hint = {
            ArtifactFormat.ORT_GENAI: "; use --int4 for generation versions",
            # One Triton model serves one backend: an ONNX version cannot be live beside a TorchScript one.
            ArtifactFormat.TORCHSCRIPT: "; register the model's ONNX export under the model (or a new name) and "
            "optimize that",
        }.get(source.format, "")
        raise FailedPrecondition(
            f"from_version: version {from_version} of {model!r} is {source.format.value}; "
            f"optimize --{optimization} takes ONNX versions{hint}"
        )
    if generation_model:
        raise FailedPrecondition(
            f"from_version: version {from_version} of {model!r} is a generation model; "
            f"optimize --{optimization} takes single-file ONNX versions"
        )
    if optimization == "int8" and source.preprocessing.kind == PreprocessingKind.VISION and not calibrated:
        raise FailedPrecondition(
            f"calibration: version {from_version} of {model!r} is an image model; its int8 is static (the "
            "convolutions' activations too) and needs calibration inputs (--calibration FILE.npy)"
        )


async def optimize(
    registry: "Registry",
    model: str,
    from_version: int,
    int8: bool,
    policy: "RolloutPolicy",
    policy_given: set[str],
    actor: str,
    reason: str,
    fp16: bool = False,
    int4: bool = False,
    calibration: bytes = b"",
) -> Optimized:
    check_name(model)
    optimization = chosen(int8, fp16, int4)
    source = registry.require_ready(model, from_version, "from_version")
    check_source(model, from_version, source, optimization, calibrated=bool(calibration))
    inputs = calibration_inputs(calibration, source, from_version) if calibration else None
    if "min_shadow_agreement" not in policy_given:
        policy = replace(policy, min_shadow_agreement=OPTIMIZE_MIN_AGREEMENT)
    policy.check()
    if registry.store.alias(model, "production") is None:
        raise FailedPrecondition(f"model {model!r} has no 'production' alias to roll the optimized version out against")
    running = registry.rollouts.store.latest(model)
    if running is not None and running.state.value == "running":
        raise FailedPrecondition(f"model {model!r} already has a rollout running; abort it first")
    folder = registry.repository.version_dir(model, from_version)
    path = folder / generation.GENAI_CONFIG if optimization == "int4" else folder / "model.onnx"
    if not path.is_file():
        raise FailedPrecondition(f"from_version: {path.name} of version {from_version} is not in the repository")
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="maas-optimize-") as tmp:
        if optimization == "int4":
            dest, described = Path(tmp) / "folder.tar", "int4 (MatMulNBits, blocks of 32)"

            def make() -> None:
                quantize_int4(folder, Path(tmp) / "folder")
                pack(Path(tmp) / "folder", dest)

            await loop.run_in_executor(registry.executor, make)
        elif inputs is not None:
            dest = Path(tmp) / "model.onnx"
            described = f"int8 (static quantization, calibrated on {len(inputs)} inputs)"
            name = source.signature.inputs[0].name
            await loop.run_in_executor(registry.executor, quantize_int8_static, path, dest, inputs, name)
        else:
            transform, described = OPTIMIZATIONS[optimization]
            dest = Path(tmp) / "model.onnx"
            await loop.run_in_executor(registry.executor, transform, path, dest)
        data_size = dest.stat().st_size
        digest = await loop.run_in_executor(registry.executor, lambda: hashlib.sha256(dest.read_bytes()).hexdigest())
        request = RegistrationRequest(
            model=model,
            format=source.format,
            sha256=digest,
            size_bytes=data_size,
            preprocessing=source.preprocessing,
            postprocessing=source.postprocessing,
            labels=source.labels,
            tags={**source.tags, "optimized_from": str(from_version), "optimization": optimization},
            max_batch_size=source.max_batch_size,
            actor=actor or "optimize",
            description=f"{described} of v{from_version}" + (f": {reason}" if reason else ""),
        )

        async def chunks():
            with open(dest, "rb") as f:
                while block := f.read(CHUNK):
                    yield block

        version = await registry.register(request, chunks())
    log.info(
        "optimized version registered",
        extra={
            "model": model,
            "from": from_version,
            "version": version.version,
            "size_before": source.size_bytes,
            "size_after": data_size,
        },
    )
    deadline = loop.time() + registry.deployment.load_timeout + 30
    while (state := registry.store.version(model, version.version).state) in (
        VersionState.REGISTERED,
        VersionState.LOADING,
    ):
        if loop.time() > deadline:
            raise FailedPrecondition(f"optimized version {version.version} of {model!r} did not become ready")
        await asyncio.sleep(0.2)
    if state != VersionState.READY:
        found = registry.store.version(model, version.version)
        raise FailedPrecondition(
            f"optimized version {version.version} of {model!r} is {state.value}: {found.state_reason}"
        )
    rollout = await registry.rollouts.start_rollout(
        model, version.version, policy, False, actor or "optimize", f"optimize --{optimization} of v{from_version}"
    )
    return Optimized(registry.store.version(model, version.version), source.size_bytes, data_size, rollout)
