"""What Triton's errors mean to the router's callers, in one place for both router ports (the compiled
data path gets the markers as flags: services/router/fastpath.py).

- A backend that fails to execute a request (ONNX Runtime or PyTorch refusing its tensors: a sequence
  longer than the model takes, token ids outside the vocabulary, a zero dimension) makes Triton answer
  INTERNAL. The model serves other requests: the request is at fault, so the caller gets
  INVALID_ARGUMENT (not retryable) with Triton's message, not UNAVAILABLE.
- On the Open Inference Protocol, the errors Triton defines keep Triton's wording (clients match on
  it), our detail after it (see oip_worded).
"""
from __future__ import annotations

import functools

import grpc

from services.shared.errors import InvalidArgument, ServiceError, bounded

# Substrings of Triton's INTERNAL message when a backend refused to execute the request's tensors.
MODEL_INPUT_ERROR_MARKERS = ("[ONNXRuntimeError]", "PyTorch execute failure")


def model_input_error(exc: grpc.aio.AioRpcError) -> InvalidArgument | None:
    """The INVALID_ARGUMENT a Triton failure stands for, or None when it is no model-side input error."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.INTERNAL and any(marker in details for marker in MODEL_INPUT_ERROR_MARKERS):
        return InvalidArgument(bounded(details))
    return None


def oip_worded(handler):
    """An OIP handler whose routing errors start with Triton's own words for them (routing.UnknownModel, …)."""
    @functools.wraps(handler)
    async def worded(request, context):
        try:
            return await handler(request, context)
        except ServiceError as exc:
            wording = getattr(exc, "triton_wording", None)
            if wording is not None and not exc.message.startswith(wording):
                exc.message = f"{wording} ({exc.message})"
            raise
    return worded
