"""triton_reachable: ready when one replica answers live; otherwise a reason naming every address."""

from __future__ import annotations

import asyncio

import grpc

from services.shared.discovery import DiscoveryConfig
from services.shared.readiness import MAX_ERROR_CHARS, error_text, triton_reachable, where_from


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code, details):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def answers(by_address):
    async def live(address, timeout):
        outcome = by_address[address]
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "hang":
            await asyncio.sleep(10)
        return outcome

    return live


async def test_no_replica_known_names_where_they_come_from():
    where = where_from(DiscoveryConfig(mode="endpointslices", service="maas-triton", namespace="ml"))
    reason = await triton_reachable([], answers({}), 1.0, where)
    assert reason == "no Triton replica known yet (from ready endpoints of Service ml/maas-triton)"


async def test_one_live_replica_is_enough():
    live = answers({"a:8001": FakeRpcError(grpc.StatusCode.UNAVAILABLE, "refused"), "b:8001": True})
    assert await triton_reachable(["a:8001", "b:8001"], live, 1.0, "x") is None


async def test_every_address_and_its_error_named():
    live = answers(
        {
            "a:8001": FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect: Connection refused"),
            "b:8001": False,
            "c:8001": "hang",
        }
    )
    reason = await triton_reachable(["c:8001", "a:8001", "b:8001"], live, 0.05, "x")
    assert reason == (
        "Triton at a:8001 unreachable: UNAVAILABLE: failed to connect: Connection refused; "
        "Triton at b:8001 unreachable: answers not live; "
        "Triton at c:8001 unreachable: no answer within 0.05 s"
    )


async def test_long_errors_are_cut():
    live = answers({"a:1": FakeRpcError(grpc.StatusCode.UNAVAILABLE, "x" * 5000)})
    reason = await triton_reachable(["a:1"], live, 1.0, "x")
    assert len(reason) < MAX_ERROR_CHARS + 60 and reason.endswith("...")


def test_error_text_of_tritonclient_exceptions():
    from tritonclient.utils import InferenceServerException

    assert (
        error_text(InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE"))
        == "UNAVAILABLE: failed to connect"
    )
    assert error_text(InferenceServerException("no status")) == "no status"
