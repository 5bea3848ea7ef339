"""Triton replicas the registry keeps in step through Triton's repository API (explicit model control).

Every load/unload goes to every replica. A replica added later (add_replicas) is in the fleet at once,
so it receives every load and unload from then on, but it is "behind" on each model until the
Deployment has applied that model's live versions to it (caught_up): warm-up inferences skip it for
those models, since a load that began before it joined never reached it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from services.registry.domain import Signature
from services.registry.tritonconfig import to_json
from services.shared.errors import Unavailable
from services.shared.tls import TlsSettings, channel_credentials
from services.shared.tls import channel_options as tls_channel_options
from services.shared.tensors import numpy_dtype

log = logging.getLogger(__name__)

# Dynamic dimensions of the warm-up input take this size (a short sequence, a small image side).
WARMUP_DYNAMIC_DIM = 8
SETTLE_POLL_SECONDS = 0.05


class TritonError(Exception):
    """Triton refused or failed an operation; the message carries Triton's reason."""


def warmup_inputs(signature: Signature, max_batch_size: int) -> list[InferInput]:
    inputs = []
    for spec in signature.inputs:
        shape = [WARMUP_DYNAMIC_DIM if d == -1 else d for d in spec.shape]
        if max_batch_size > 0:
            shape = [1, *shape]
        if spec.datatype == "BYTES":
            array = np.full(shape, b"warm-up", dtype=np.object_)
        elif spec.datatype.startswith(("INT", "UINT")):
            array = np.ones(shape, dtype=numpy_dtype(spec.datatype))  # ones: a valid token id / mask everywhere
        else:
            array = np.zeros(shape, dtype=numpy_dtype(spec.datatype) if spec.datatype != "BF16" else np.float32)
        inp = InferInput(spec.name, shape, spec.datatype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def generation_warmup_inputs() -> list[InferInput]:
    """A one-token prompt asking for one token: the cheapest whole generation."""
    inputs = []
    for name, datatype, value in (("input_ids", "INT64", [1]), ("max_tokens", "INT32", [1])):
        inp = InferInput(name, [1], datatype)
        inp.set_data_from_numpy(np.asarray(value, dtype=numpy_dtype(datatype)))
        inputs.append(inp)
    return inputs


async def _generate_once(client, model: str, version: str, inputs: list[InferInput], timeout: float) -> None:
    """One decoupled request over ModelStreamInfer, read up to its final response."""

    async def requests():
        yield {"model_name": model, "model_version": version, "inputs": inputs}

    responses = client.stream_infer(requests(), stream_timeout=timeout)
    try:
        async for result, error in responses:
            if error is not None:
                raise error
            params = result.get_response().parameters
            finish = result.as_numpy("finish_reason")
            if params["triton_final_response"].bool_param or (finish is not None and finish.size and finish[0]):
                return  # the contract's final response carries the finish reason
        raise InferenceServerException("the stream ended before the final response")
    finally:
        responses.cancel()


class TritonFleet:
    def __init__(self, addresses: Iterable[str] = (), timeout: float = 300.0, tls: TlsSettings | None = None):
        self.timeout = timeout
        self.tls = tls  # mTLS towards Triton (its --grpc-use-ssl-mutual), None = plaintext
        self._clients: dict[str, triton_aio.InferenceServerClient] = {}
        # replica -> models whose live versions it has not been given yet (it joined after they loaded)
        self._behind: dict[str, set[str]] = {}
        for address in addresses:
            self._clients[address] = self._client(address)

    def _client(self, address: str) -> triton_aio.InferenceServerClient:
        if self.tls is None:
            return triton_aio.InferenceServerClient(address)
        extra = tls_channel_options(self.tls)
        return triton_aio.InferenceServerClient(
            address,
            creds=channel_credentials(self.tls),
            channel_args=[
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
                *extra,
            ]
            if extra
            else None,
        )

    @property
    def addresses(self) -> list[str]:
        """Replicas that serve every live version (joined and caught up)."""
        return [a for a in self._clients if not self._behind.get(a)]

    @property
    def members(self) -> list[str]:
        """Every replica loads and unloads go to, including those still catching up."""
        return list(self._clients)

    async def close(self) -> None:
        for address in list(self._clients):
            await self.remove_replica(address)

    def add_replicas(self, addresses: Iterable[str], models: Iterable[str]) -> list[str]:
        """Add the replicas not yet in the fleet, behind on every one of `models`; returns those added."""
        added = sorted(set(addresses) - set(self._clients))
        for address in added:
            self._clients[address] = self._client(address)
            self._behind[address] = set(models)
        return added

    async def remove_replica(self, address: str) -> None:
        client = self._clients.pop(address, None)
        self._behind.pop(address, None)
        if client is not None:
            await client.close()

    def caught_up(self, address: str, model: str) -> None:
        """`address` now serves `model`'s live versions: warm-ups include it again."""
        self._behind.get(address, set()).discard(model)

    def behind(self, address: str) -> set[str]:
        return set(self._behind.get(address, ()))

    async def apply(self, model: str, config, live: list[int], addresses: list[str] | None = None) -> None:
        """Make every replica (or those in `addresses`) serve exactly `live` versions of `model` (none = unloaded)."""
        await asyncio.gather(
            *(
                self._apply_one(a, c, model, config, live)
                for a, c in list(self._clients.items())
                if addresses is None or a in addresses
            )
        )

    async def _apply_one(self, address: str, client, model: str, config, live: list[int]) -> None:
        try:
            if live:
                await client.load_model(model, config=to_json(config))
            else:
                await client.unload_model(model)
        except InferenceServerException as exc:
            action = f"load of {model} versions {sorted(live)}" if live else f"unload of {model}"
            raise TritonError(f"Triton {address}: {action} failed: {exc.message()}") from None
        await self._wait_settled(client, model, set(live))

    async def _wait_settled(self, client, model: str, live: set[int]) -> None:
        """Unloads are asynchronous in Triton: wait until exactly `live` versions are READY."""
        deadline = time.monotonic() + self.timeout
        while True:
            states = await self.version_states(client, model)
            ready = {v for v, (state, _) in states.items() if state == "READY"}
            busy = {v for v, (state, _) in states.items() if state in ("LOADING", "UNLOADING")}
            if ready == live and not busy:
                return
            failed = {
                v: reason for v, (state, reason) in states.items() if v in live and state == "UNAVAILABLE" and reason
            }
            if failed:
                raise TritonError("; ".join(f"version {v}: {r}" for v, r in sorted(failed.items())))
            if time.monotonic() > deadline:
                raise TritonError(
                    f"Triton did not settle on versions {sorted(live)} of {model} in {self.timeout:.0f}s (now {states})"
                )
            await asyncio.sleep(SETTLE_POLL_SECONDS)

    @staticmethod
    async def version_states(client, model: str) -> dict[int, tuple[str, str]]:
        index = await client.get_model_repository_index(as_json=True)
        return {
            int(m["version"]): (m.get("state", ""), m.get("reason", ""))
            for m in index.get("models", [])
            if m.get("name") == model and m.get("version", "").isdigit()
        }

    async def ready_versions(self) -> dict[str, dict[str, set[int]]]:
        """{replica address: {model: READY versions}}; unreachable replicas are left out."""
        out = {}
        for address, client in list(self._clients.items()):
            try:
                index = await client.get_model_repository_index(as_json=True)
            except InferenceServerException:
                continue
            models: dict[str, set[int]] = {}
            for m in index.get("models", []):
                if m.get("state") == "READY" and m.get("version", "").isdigit():
                    models.setdefault(m["name"], set()).add(int(m["version"]))
            out[address] = models
        return out

    async def ready_on(self, address: str, model: str) -> set[int]:
        states = await self.version_states(self._clients[address], model)
        return {v for v, (state, _) in states.items() if state == "READY"}

    async def warm_up(
        self, model: str, version: int, signature: Signature, max_batch_size: int, generation: bool = False
    ) -> int:
        """One inference with a small dummy input on every replica that is not behind on `model`: proves
        the version really serves (a generation version: one token over ModelStreamInfer). Returns how
        many replicas served it (0: none could be asked)."""
        inputs = generation_warmup_inputs() if generation else warmup_inputs(signature, max_batch_size)
        served = 0
        for address, client in list(self._clients.items()):
            if model in self._behind.get(address, ()):
                continue  # joined while this load was under way; the Deployment catches it up afterwards
            try:
                if generation:
                    await _generate_once(client, model, str(version), inputs, self.timeout)
                else:
                    await client.infer(model, inputs, model_version=str(version), client_timeout=self.timeout)
            except InferenceServerException as exc:
                raise TritonError(
                    f"warm-up inference on version {version} failed on {address}: {exc.message()}"
                ) from None
            served += 1
        return served

    async def wait_reachable(self, timeout: float) -> bool:
        """Wait (up to `timeout`) until every replica answers; False if one still does not."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.check_reachable()
                return True
            except Unavailable:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.5)

    async def live(self, address: str, timeout: float) -> bool:
        """ServerLive of one member (raises InferenceServerException when it does not answer)."""
        return await self._clients[address].is_server_live(client_timeout=timeout)

    async def check_reachable(self) -> None:
        for address, client in list(self._clients.items()):
            try:
                if not await client.is_server_live():
                    raise Unavailable(f"Triton at {address} is not live")
            except InferenceServerException as exc:
                raise Unavailable(f"Triton at {address} is unreachable: {exc.message()}") from None
