"""The decoupled text-generation model contract (docs/generation.md), in one place.

The registry writes it into a generation version's Triton config and warms versions up with it; the
router builds its ModelStreamInfer requests and reads the responses with these names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.shared.tensors import numpy_dtype

BACKEND = "onnxruntime_genai"
GENAI_CONFIG = "genai_config.json"

# (name, Triton datatype, dims without a batch dimension, optional)
INPUTS = (
    ("input_ids", "INT64", (-1,), False),
    ("max_tokens", "INT32", (1,), True),
    ("temperature", "FP32", (1,), True),
    ("top_p", "FP32", (1,), True),
    ("top_k", "INT32", (1,), True),
    ("seed", "UINT64", (1,), True),
    ("repetition_penalty", "FP32", (1,), True),
    ("stop_token_ids", "INT64", (-1,), True),
)


_DATATYPES = {name: datatype for name, datatype, _, _ in INPUTS}
_RAW_DTYPES = {name: numpy_dtype(datatype).newbyteorder("<") for name, datatype in _DATATYPES.items()}


def input_dtype(name: str) -> np.dtype:
    """The raw (little-endian) numpy dtype of the contract's input `name`."""
    return _RAW_DTYPES[name]


def add_input(request: Any, name: str, values) -> None:
    """Appends the contract's input `name` to a ModelInferRequest, its values as raw contents."""
    array = np.asarray(values, dtype=input_dtype(name))
    request.inputs.add(name=name, datatype=_DATATYPES[name], shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())


OUTPUTS = (
    ("output_ids", "INT64", (-1,)),
    ("finish_reason", "BYTES", (1,)),
    ("usage", "INT32", (2,)),
)

# Triton config parameters the model reads (and the router, to validate before any work).
PARAM_MAX_TOKENS_CAP = "max_tokens_cap"
PARAM_DEFAULT_MAX_TOKENS = "default_max_tokens"
PARAM_MAX_SEQUENCES = "max_sequences"
PARAM_MAX_QUEUED = "max_queued"  # requests waiting for a slot; more are refused (UNAVAILABLE)
PARAM_MAX_BATCH_ROWS = "max_batch_rows"  # rows of one batched generator
PARAM_BATCH_WINDOW_MS = "batch_window_ms"  # how long a request waits for companions while others decode
PARAM_STREAM_INTERVAL_TOKENS = "stream_interval_tokens"  # tokens per response after the first
PARAM_CONTEXT_LENGTH = "context_length"  # written by the registry from genai_config.json
DEFAULT_MAX_TOKENS_CAP = 1024
DEFAULT_DEFAULT_MAX_TOKENS = 64
DEFAULT_MAX_SEQUENCES = 16
DEFAULT_MAX_QUEUED = 256
DEFAULT_MAX_BATCH_ROWS = 8
DEFAULT_BATCH_WINDOW_MS = 20
DEFAULT_STREAM_INTERVAL_TOKENS = 4

# finish_reason values of the final response.
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
