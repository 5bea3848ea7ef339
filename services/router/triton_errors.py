"""What Triton's errors mean to the router's callers, in one place for both router ports (the OIP
fast path gets the markers as flags: services/router/fastpath.py).

- A backend that fails to execute a request (ONNX Runtime or PyTorch refusing its tensors: a sequence
  longer than the model takes, token ids outside the vocabulary, a zero dimension) makes Triton answer
  INTERNAL. The model serves other requests: the request is at fault, so the caller gets
  INVALID_ARGUMENT (not retryable) with Triton's message, not UNAVAILABLE.
- A version the registry says is READY that a Triton replica does not serve (yet): NOT_FOUND "Request
  for unknown model: 'x' is not found" from a replica restarted empty, UNAVAILABLE "... is not at ready
  state" while it (re)loads or after an unload behind the registry's back. The registry reloads it
  (after a restart, by its watchdog), so the caller gets UNAVAILABLE, retryable, saying so (not_serving).
  NOT_FOUND stays for what the registry does not have (routing.py answers that before Triton is asked).
- On the Open Inference Protocol, the errors Triton defines keep Triton's wording (clients match on
  it), our detail after it (see oip_worded).
"""

from __future__ import annotations

import functools

import grpc

from services.shared.errors import InvalidArgument, ServiceError, Unavailable, bounded

# Substrings of Triton's INTERNAL message when a backend refused to execute the request's tensors.
MODEL_INPUT_ERROR_MARKERS = ("[ONNXRuntimeError]", "PyTorch execute failure")
# How Triton's NOT_FOUND / UNAVAILABLE message starts when it does not serve the model (version) asked for.
NOT_SERVING_MARKER = "Request for unknown model"
NOT_SERVING_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
# The answer to it (both ports; the compiled one gets it as a flag): Triton's own words for a version
# that is not ready yet first, then why and what Triton said. Placeholders: {model} {version} {detail}.
NOT_SERVING_MESSAGE = (
    "Request for unknown model: '{model}' version {version} is not at ready state (READY in the "
    "registry, (re)loading on Triton - e.g. after a Triton restart: retry; Triton said: {detail})"
)


def model_input_error(exc: grpc.aio.AioRpcError) -> InvalidArgument | None:
    """The INVALID_ARGUMENT a Triton failure stands for, or None when it is no model-side input error."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.INTERNAL and any(marker in details for marker in MODEL_INPUT_ERROR_MARKERS):
        return InvalidArgument(bounded(details))
    return None


def not_serving_message(model: str, version: str, detail: str) -> str:
    return bounded(
        NOT_SERVING_MESSAGE.replace("{model}", model).replace("{version}", version or "?").replace("{detail}", detail)
    )


def not_serving(code: grpc.StatusCode, details: str, model: str, version: str) -> Unavailable | None:
    """The UNAVAILABLE for Triton not serving a (READY) version the router sent it, or None when the
    failure is something else. The router only sends Triton versions its routing table has as READY."""
    if code in NOT_SERVING_CODES and details.startswith(NOT_SERVING_MARKER):
        return Unavailable(not_serving_message(model, version, details))
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
