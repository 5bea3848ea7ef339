"""Input tensors checked against the version's signature before Triton sees them.

A request Triton would refuse costs it a queue slot and, for model-side limits (a sequence past the
position table, an id past the vocabulary), an execute that fails inside the backend. The router knows
the signature (registry), the batch limit (Triton's config, cached) and, for tokenizer-fed versions,
the vocabulary: it refuses such requests itself with INVALID_ARGUMENT. Where Triton defines an error for
the situation the message starts with Triton's words (the compiled OIP fast path forwards to Triton,
which answers them), then says which limit the router checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.router.routing import PreKind, VersionInfo
from services.shared.errors import InvalidArgument
from services.shared.tensors import numpy_dtype

# Tags a version may carry (set at registration) declaring limits its signature cannot express.
MAX_SEQUENCE_LENGTH_TAG = "max_sequence_length"
VOCAB_SIZE_TAG = "vocab_size"
# The tokenizer fills this input with token ids: the one checked against the vocabulary.
IDS_INPUT = "input_ids"


@dataclass(frozen=True)
class Given:
    """One input of a request: name, datatype, shape, and its raw bytes (None when sent as typed contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None


@dataclass(frozen=True)
class Limits:
    max_batch_size: int | None = None  # None: not checked (the router slices bigger batches itself)
    has_batch_dim: bool = True
    max_sequence_length: int = 0  # 0 = unknown
    vocab_size: int = 0  # 0 = unknown


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check(info: VersionInfo, inputs: Sequence[Given], limits: Limits) -> None:
    """Raises InvalidArgument naming the input and the limit at fault; a version without a signature
    is not checked (Triton's own checks answer)."""
    if not info.inputs:
        return
    model = info.model
    specs = {spec.name: spec for spec in info.inputs}
    names = [given.name for given in inputs]
    for given in inputs:
        if given.name not in specs:
            raise InvalidArgument(
                f"unexpected inference input '{given.name}' for model '{model}' "
                f"(version {info.version} takes {sorted(specs)})"
            )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidArgument(f"input '{dup}' given more than once for model '{model}'")
    missing = [name for name in specs if name not in names]
    if missing:
        raise InvalidArgument(
            f"expected {len(specs)} inputs but got {len(names)} inputs for model '{model}'. Got input(s) "
            f"{names}, but missing required input(s) {missing}. Please provide all required input(s)."
        )
    for given in inputs:
        _check_one(info, given, limits)


def _check_one(info: VersionInfo, given: Given, limits: Limits) -> None:
    spec = next(s for s in info.inputs if s.name == given.name)
    model, name, shape = info.model, given.name, tuple(given.shape)
    if given.datatype != spec.datatype:
        raise InvalidArgument(
            f"inference input '{name}' data-type is '{given.datatype}', but model '{model}' expects '{spec.datatype}'"
        )
    expected = ((-1,) if limits.has_batch_dim else ()) + tuple(spec.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}': negative dimension in shape {_dims(shape)}")
    if len(shape) != len(expected) or any(e >= 0 and e != d for e, d in zip(expected, shape)):
        raise InvalidArgument(
            f"unexpected shape for input '{name}' for model '{model}'. Expected {_dims(expected)}, got {_dims(shape)}"
        )
    if limits.has_batch_dim and limits.max_batch_size and shape[0] > limits.max_batch_size:
        raise InvalidArgument(
            f"inference request batch-size must be <= {limits.max_batch_size} for '{model}' "
            f"(input '{name}' has batch dimension {shape[0]})"
        )
    dynamic = [
        d
        for e, d in zip(expected[1 if limits.has_batch_dim else 0 :], shape[1 if limits.has_batch_dim else 0 :])
        if e < 0
    ]
    if limits.max_sequence_length and any(d > limits.max_sequence_length for d in dynamic):
        raise InvalidArgument(
            f"input '{name}' for model '{model}': sequence length {max(dynamic)} exceeds "
            f"the model's maximum of {limits.max_sequence_length} positions"
        )
    if given.datatype == "BYTES" or given.raw is None:
        return  # variable-length elements / typed contents: Triton counts those
    itemsize = numpy_dtype(given.datatype).itemsize
    size = math.prod(shape) * itemsize  # Python ints: no int64 wrap-around
    if len(given.raw) != size:
        raise InvalidArgument(
            f"input byte size mismatch for input '{name}' for model '{model}'. Expected {size}, got {len(given.raw)}"
        )
    if name == IDS_INPUT and limits.vocab_size and given.datatype in ("INT64", "INT32") and size:
        _check_ids(model, name, np.frombuffer(given.raw, dtype=numpy_dtype(given.datatype)), limits.vocab_size)


def _check_ids(model: str, name: str, ids: np.ndarray, vocab_size: int) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise InvalidArgument(
            f"input '{name}' for model '{model}': token id {int(ids[bad[0]])} at flat index "
            f"{int(bad[0])} is outside the vocabulary [0, {vocab_size})"
        )


def beyond_triton(info: VersionInfo) -> bool:
    """The version has limits Triton does not check before executing (token ids, sequence length): the
    compiled OIP fast path, which forwards bytes unparsed, hands its calls to the main port."""
    takes_ids = info.pre_kind == PreKind.TOKENIZER and any(s.name == IDS_INPUT for s in info.inputs)
    return takes_ids or bool(info.vocab_size or info.max_sequence_length)


def declared_limit(tags: Mapping[str, str], key: str) -> int:
    """A positive integer limit from a version tag; 0 when absent or not a positive ASCII integer."""
    value = tags.get(key, "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else 0
