"""numpy ⇄ maas.v1.Tensor in Triton's raw little-endian layout (no per-element encoding).

Used by the client and the services alike, so it needs nothing but numpy and the generated stubs; a bad
tensor raises TensorError (a ValueError), which the services answer as INVALID_ARGUMENT
(services/shared/tensors.py).
"""

from __future__ import annotations

import math

import numpy as np

from maas.v1 import tensor_pb2


class TensorError(ValueError):
    """A tensor this layout cannot hold or read: unknown datatype, bad shape, wrong byte count."""


# Triton datatype strings ⇄ little-endian numpy dtypes.
_DTYPES = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise TensorError(f"unsupported tensor datatype {datatype!r}; one of {sorted(_DTYPES)}") from None


def triton_datatype(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)]
    except KeyError:
        raise TensorError(f"unsupported numpy dtype {dtype}") from None


def to_proto(name: str, array: np.ndarray) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return tensor_pb2.Tensor(
        name=name, datatype=triton_datatype(array.dtype), shape=list(array.shape), raw_contents=array.tobytes()
    )


def from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """A read-only view over the message bytes; checks the byte count matches the shape."""
    dtype = numpy_dtype(tensor.datatype)
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor {tensor.name!r}: negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: an int64 product could wrap and match
    if len(tensor.raw_contents) != expected:
        raise TensorError(
            f"tensor {tensor.name!r}: {len(tensor.raw_contents)} bytes for shape {list(shape)} {tensor.datatype}, "
            f"expected {expected}"
        )
    return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(shape)
