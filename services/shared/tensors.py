"""The tensor conversion (maas/tensors.py) for the services: a bad tensor is the caller's INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from maas import tensors
from maas.v1 import tensor_pb2
from services.shared.errors import InvalidArgument


@contextmanager
def _invalid_argument() -> Iterator[None]:
    try:
        yield
    except tensors.TensorError as exc:
        raise InvalidArgument(str(exc)) from None


def numpy_dtype(datatype: str) -> np.dtype:
    with _invalid_argument():
        return tensors.numpy_dtype(datatype)


def triton_datatype(dtype: np.dtype) -> str:
    with _invalid_argument():
        return tensors.triton_datatype(dtype)


def to_proto(name: str, array: np.ndarray) -> tensor_pb2.Tensor:
    with _invalid_argument():
        return tensors.to_proto(name, array)


def from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """A read-only view over the message bytes; checks the byte count matches the shape."""
    with _invalid_argument():
        return tensors.from_proto(tensor)
