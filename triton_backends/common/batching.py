"""Shared by our Python-based Triton backends (onnxruntime, pytorch): config I/O, model file lookup,
and executing the requests Triton's dynamic batcher hands over as a few concatenated batches.

model.py files load this by path (see load_common there), so it needs no package install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import triton_python_backend_utils as pb_utils


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # without the batch dimension; -1 = any


def _specs(entries: list[dict]) -> list[TensorSpec]:
    out = []
    for e in entries:
        dims = tuple(int(d) for d in e.get("dims", []))
        if "reshape" in e:
            raise ValueError(f"tensor {e['name']!r}: 'reshape' is not supported by this CPU backend")
        out.append(TensorSpec(e["name"], np.dtype(pb_utils.triton_string_to_numpy(e["data_type"])), dims))
    return out


def parameter(config: dict, key: str, default: str = "") -> str:
    """A config.pbtxt `parameters` value (the native backends' knobs, e.g. INTRA_OP_THREAD_COUNT)."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value.strip() or default


# glibc serves allocations over its mmap threshold (dynamic, at most 32 MiB) with fresh mmap()s and
# unmaps them on free, so every batch pays page faults and zeroing for its big activations again:
# EfficientNet-Lite0 at batch 16 spent ~40% of its time in the kernel and took 25 ms per image against
# 10 ms with freed memory kept for reuse. Keeping it costs resident memory up to the peak batch's.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Let malloc reuse freed blocks up to `limit` bytes instead of returning them to the kernel.
    False (and no change) when the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def model_file(args: Mapping[str, str], config: dict, default_name: str) -> Path:
    """<repo>/<model>/<version>/<default_model_filename>, like the native backends."""
    name = config.get("default_model_filename") or default_name
    path = Path(args["model_repository"]) / str(args["model_version"]) / name
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path} (run tools/build_models.py)")
    return path


class BatchedModel:
    """Validates requests against the config and runs compatible ones as one batch.

    `infer(feeds)` gets {input name: array with the batch axis first} and returns one array per
    config output, in config order, each with the same leading batch size.
    """

    def __init__(self, model_config_json: str) -> None:
        self.config = json.loads(model_config_json)
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        self.inputs = _specs(self.config.get("input", []))
        self.outputs = _specs(self.config.get("output", []))

    def _read(self, request) -> tuple[dict[str, np.ndarray], int]:
        """The request's inputs as arrays and its batch size; ValueError with a clear message if bad."""
        feeds: dict[str, np.ndarray] = {}
        batch = None
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise ValueError(f"missing input {spec.name!r}")
            arr = tensor.as_numpy()
            if arr.dtype != spec.dtype:
                raise ValueError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {arr.dtype}")
            shape = arr.shape[1:] if self.max_batch_size > 0 else arr.shape
            if len(shape) != len(spec.dims) or any(d != -1 and d != s for d, s in zip(spec.dims, shape)):
                want = ([-1] if self.max_batch_size > 0 else []) + list(spec.dims)
                raise ValueError(f"input {spec.name!r}: expected shape {want}, got {list(arr.shape)}")
            if self.max_batch_size > 0:
                if batch is not None and arr.shape[0] != batch:
                    raise ValueError(f"input {spec.name!r}: batch size {arr.shape[0]} differs from {batch}")
                batch = arr.shape[0]
            feeds[spec.name] = arr
        return feeds, batch or 1

    def execute(self, requests: Sequence, infer: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]) -> list:
        responses: list = [None] * len(requests)
        # Group requests whose non-batch shapes agree (e.g. same sequence length); each group is one run.
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray], int]]] = {}
        for i, request in enumerate(requests):
            try:
                feeds, n = self._read(request)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            if self.max_batch_size > 0:
                key = tuple(feeds[s.name].shape[1:] for s in self.inputs)
            else:
                key = ("unbatched", i)  # no batch axis: nothing to concatenate
            groups.setdefault(key, []).append((i, feeds, n))

        for members in groups.values():
            self._run(members, infer, responses)
        return responses

    def _run(self, members: list, infer: Callable, responses: list) -> None:
        """Run one group as one batch and split the results back into the members' responses."""
        try:
            if len(members) == 1:
                feeds = members[0][1]
            else:
                feeds = {s.name: np.concatenate([m[1][s.name] for m in members]) for s in self.inputs}
            results = [np.asarray(r) for r in infer(feeds)]
            if len(results) != len(self.outputs):
                raise RuntimeError(f"model returned {len(results)} outputs, config declares {len(self.outputs)}")
            total = sum(m[2] for m in members)
            if self.max_batch_size > 0 and any(r.shape[:1] != (total,) for r in results):
                raise RuntimeError(f"model output batch sizes {[r.shape[:1] for r in results]} != {total}")
        except Exception as exc:  # noqa: BLE001 - a failed batch is split to find the failing request
            if len(members) > 1:  # a data-dependent failure (e.g. a token id out of range): find its owner
                for m in members:
                    self._run([m], infer, responses)
                return
            err = pb_utils.TritonError(f"inference failed: {type(exc).__name__}: {exc}")
            responses[members[0][0]] = pb_utils.InferenceResponse(error=err)
            return
        start = 0
        for i, _, n in members:
            part = [r[start : start + n] if self.max_batch_size > 0 else r for r in results]
            start += n
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(s.name, np.ascontiguousarray(r.astype(s.dtype, copy=False)))
                    for s, r in zip(self.outputs, part)
                ]
            )
