"""Optimize, verify, promote: a new version made from a READY ONNX version, rolled out behind gates.

`int8`: ONNX Runtime's dynamic quantization (weights to int8 with per-channel scales, activations
quantized at run time: no calibration data needed), the usual choice for transformer encoders such as
minilm on CPUs. `fp16`: weights and compute to float16 with ONNX Runtime's converter
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
    RegistrationRequest,
    Version,
    VersionState,
    check_name,
)
from services.shared import generation
from services.shared.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
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


def check_source(model: str, from_version: int, source: Version, optimization: str) -> None:
    """FAILED_PRECONDITION naming from_version when the optimisation does not apply to the version's kind."""
    generation_model = source.postprocessing.kind == PostprocessingKind.GENERATION
    if optimization == "int4":
        if source.format != ArtifactFormat.ORT_GENAI or not generation_model:
            raise FailedPrecondition(
                f"from_version: version {from_version} of {model!r} is {source.format.value}; optimize --int4 "
                f"takes generation versions (ORT_GENAI folders); use --int8 or --fp16 for ONNX models"
            )
        return
    if source.format != ArtifactFormat.ONNX:
        hint = "; use --int4 for generation versions" if source.format == ArtifactFormat.ORT_GENAI else ""
        raise FailedPrecondition(
            f"from_version: version {from_version} of {model!r} is {source.format.value}; "
            f"optimize --{optimization} takes ONNX versions{hint}"
        )
    if generation_model:
        raise FailedPrecondition(
            f"from_version: version {from_version} of {model!r} is a generation model; "
            f"optimize --{optimization} takes single-file ONNX versions"
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
) -> Optimized:
    check_name(model)
    optimization = chosen(int8, fp16, int4)
    source = registry.require_ready(model, from_version, "from_version")
    check_source(model, from_version, source, optimization)
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
