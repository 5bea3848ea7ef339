"""Shadow copies of generations that arrive over OIP ModelStreamInfer (tritonclient's stream API).

Router.Generate shadows in generation.py; a raw OIP stream carries the same decoupled contract, so its
generations are compared the same way: once the caller's generation has ended normally (finish reason
stop / length), the same request goes to the shadow version on a stream of its own, and the two token
id sequences are compared (shadow.compare_tokens) off the caller's path.

Requests of one stream may run at once and Triton answers them interleaved, told apart only by their
id, which callers often leave empty (tritonclient's default). So a shadowed request is forwarded under
an id of the router's, and its responses are given the caller's id back before they are relayed. A
sampled request without a seed gets one random seed for both copies (the same draw, so the comparison
means something); everything else in the request goes to both unchanged.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from services.router.dataplane import Dataplane
from services.router.generation import comparable_shadow, read_response
from services.router.routing import Route, VersionInfo
from services.router.shadow import compare_tokens
from services.shared import generation as contract

_COMPARED = ("stop", "length")  # a generation cut short (cancelled, failed) is not compared


@dataclass
class _Tracked:
    route: Route
    shadow: VersionInfo  # the comparable shadow version (comparable_shadow)
    request: service_pb2.ModelInferRequest  # as forwarded to the primary (under the router's id)
    caller_id: str
    started: float
    ids: list[int] = field(default_factory=list)


class StreamShadows:
    """The shadowed requests of one caller stream, from forwarding to their final response."""

    def __init__(self, plane: Dataplane):
        self.plane = plane
        self.tracked: dict[str, _Tracked] = {}

    def forward(self, request: bytes, route: Route) -> bytes:
        """The bytes Triton gets for a request already retargeted to `route`'s version."""
        shadow = comparable_shadow(route.info, route.shadow)
        if self.plane.shadow is None or shadow is None:
            return request
        parsed = service_pb2.ModelInferRequest.FromString(request)
        _seed_sampled(parsed)
        ours = f"maas-shadow-{uuid.uuid4().hex}"
        self.tracked[ours] = _Tracked(route, shadow, parsed, parsed.id, time.perf_counter())
        parsed.id = ours
        return parsed.SerializeToString()

    def relayed(self, raw: bytes) -> bytes:
        """A Triton response as the caller gets it (its own id); a final one may start the shadow copy."""
        if not self.tracked:
            return raw
        try:
            response = service_pb2.ModelStreamInferResponse.FromString(raw)
        except DecodeError:
            return raw
        entry = self.tracked.get(response.infer_response.id)
        if entry is None:
            return raw
        ids, finish, _ = read_response(response.infer_response)
        entry.ids += ids
        final = response.infer_response.parameters.get("triton_final_response")
        if response.error_message or finish or (final is not None and final.bool_param):
            del self.tracked[response.infer_response.id]
            if finish in _COMPARED and not response.error_message:
                self._submit(entry)
        response.infer_response.id = entry.caller_id
        return response.SerializeToString()

    def _submit(self, entry: _Tracked) -> None:
        runner, info, shadow = self.plane.shadow, entry.route.info, entry.shadow
        if runner is None:
            return
        primary_ids = np.asarray(entry.ids, dtype=np.int64)
        copy = Dataplane.retarget(entry.request.SerializeToString(), info.triton_model, shadow)

        async def primary_output() -> np.ndarray:
            return primary_ids

        async def shadow_output() -> np.ndarray:
            out: list[int] = []
            async with self.plane.triton.stream(runner.timeout, raw=True) as call:
                await call.write(copy)
                await call.done_writing()
                async for raw in call:
                    response = service_pb2.ModelStreamInferResponse.FromString(raw)
                    if response.error_message:
                        raise RuntimeError(f"the shadow copy failed: {response.error_message}")
                    ids, finish, _ = read_response(response.infer_response)
                    out += ids
                    if finish:
                        break
            return np.asarray(out, dtype=np.int64)

        ms = (time.perf_counter() - entry.started) * 1000
        runner.submit(info, shadow, primary_output, shadow_output, ms, comparator=compare_tokens)


def _seed_sampled(request: service_pb2.ModelInferRequest) -> None:
    """Adds one random seed to a sampled request that has none (greedy ones need none)."""
    names = [i.name for i in request.inputs]
    if "seed" in names or "temperature" not in names:
        return
    index = names.index("temperature")
    if index >= len(request.raw_input_contents):  # values in the typed contents: left as they are
        return
    temperature = np.frombuffer(request.raw_input_contents[index], dtype=contract.input_dtype("temperature"))
    if not temperature.size or float(temperature[0]) <= 0:
        return
    contract.add_input(request, "seed", [secrets.randbits(63)])
