"""The routing spec's shared vectors (tests/fixtures/routing_vectors.json, protos/maas/v1/fastpath.proto):
the Python router (routing.py, replica_pool.py, peers.py) and the compiled fast path (its --check-vectors
mode, fed the snapshot fastpath.py computes from the same routing table) give the same answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from maas.v1 import fastpath_pb2
from services.router.fastpath import find_binary, snapshot
from services.router.peers import retry_reason
from services.router.routing import ModelRoutes, RoutingTable, ServingState, Shadow, Target, VersionInfo
from services.router.triton_errors import NOT_SERVING_MARKER
from services.shared.errors import ServiceError
from services.shared.replica_pool import less_busy_of_two

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "routing_vectors.json").read_text())
ROUTES, REPLICAS, RETRIES = VECTORS["routes"], VECTORS["replicas"], VECTORS["retries"]


def target(spec: dict) -> Target:
    return Target(version=spec.get("version", 0), alias=spec.get("alias", ""), weight=spec.get("weight", 0))


def model_routes(name: str, spec: dict) -> ModelRoutes:
    shadow = spec.get("shadow")
    return ModelRoutes(
        name=name,
        versions={
            int(v): VersionInfo(model=name, version=int(v), state=ServingState[state])
            for v, state in spec["versions"].items()
        },
        aliases=dict(spec["aliases"]),
        split=tuple(target(t) for t in spec.get("split", ())),
        shadow=Shadow(target(shadow), shadow["fraction"]) if shadow else None,
    )


class Start:
    """A RoutingTable rng whose sequences all start at `start`."""

    def __init__(self, start: float):
        self.start = start

    def random(self) -> float:
        return self.start


def table(start: float = 0.0) -> RoutingTable:
    routing = RoutingTable(rng=Start(start))  # type: ignore[arg-type]
    routing.replace_all([model_routes(name, spec) for name, spec in VECTORS["models"].items()], revision=1)
    return routing


def python_route(case: dict) -> dict:
    routing = table(case.get("start", 0.0))
    try:
        for _ in range(case.get("draws", 0) + 1):
            route = routing.resolve(case["model"], *version_selector(case["version"]), case.get("key", ""))
    except ServiceError as exc:
        return {"error": exc.code.name}
    return {"version": route.info.version, "kind": route.kind.name.lower()}


def version_selector(version: str) -> tuple[int, str]:
    from services.router.dataplane import version_selector as selector

    return selector(version)


def fast_route_expected(case: dict) -> str:
    """The forwarder's line for a case: the version and kind, or "router" where the main port answers."""
    expect = case["expect"]
    if "error" in expect or case.get("fast") == "router":
        return "router"
    return f"{expect['version']}\t{expect['kind']}"


def connectivity(name: str) -> grpc.ChannelConnectivity:
    return grpc.ChannelConnectivity[name]


@pytest.mark.parametrize("case", ROUTES, ids=[f"{c['model']}:{c['version']}:{c.get('key', '')}" for c in ROUTES])
def test_python_routes_as_the_vectors_say(case):
    assert python_route(case) == case["expect"]


@pytest.mark.parametrize("case", REPLICAS)
def test_python_picks_replicas_as_the_vectors_say(case):
    assert less_busy_of_two(case["inflight"], case["first"], case["second"]) == case["expect"]


@pytest.mark.parametrize("case", RETRIES, ids=[f"{c['code']}:{c['at_issue']}:{c['at_failure']}" for c in RETRIES])
def test_python_retries_as_the_vectors_say(case):
    reason = retry_reason(
        grpc.StatusCode[case["code"]], case["message"], connectivity(case["at_issue"]), connectivity(case["at_failure"])
    )
    assert reason == case["expect"]


def test_the_fast_path_answers_the_vectors_alike(tmp_path):
    binary = find_binary()
    if binary is None:
        pytest.skip("maas-oip-fastpath is not built (make fastpath)")
    routing = table()
    snap = snapshot(routing, ["a:8001", "b:8001"])
    vectors = fastpath_pb2.RoutingVectors(
        routes=[
            fastpath_pb2.RouteCase(
                snapshot=snap,
                model=c["model"],
                model_version=c["version"],
                routing_key=c.get("key", ""),
                sequence_start=c.get("start", 0.0),
                draws=c.get("draws", 0),
            )
            for c in ROUTES
        ],
        replicas=[
            fastpath_pb2.ReplicaCase(inflight=c["inflight"], first=c["first"], second=c["second"]) for c in REPLICAS
        ],
        retries=[
            fastpath_pb2.RetryCase(
                code=grpc.StatusCode[c["code"]].value[0],
                message=c["message"],
                state_at_issue=connectivity(c["at_issue"]).value[0],
                state_at_failure=connectivity(c["at_failure"]).value[0],
            )
            for c in RETRIES
        ],
    )
    path = tmp_path / "vectors.bin"
    path.write_bytes(vectors.SerializeToString())
    answered = subprocess.run(
        [binary, "--check-vectors", str(path), "--not-serving-marker", NOT_SERVING_MARKER],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    expected = [
        *(f"route\t{fast_route_expected(c)}" for c in ROUTES),
        *(f"replica\t{c['expect']}" for c in REPLICAS),
        *(f"retry\t{c['expect'] or '-'}" for c in RETRIES),
    ]
    # "router" lines carry the kind the forwarder got to (or "-"): only the hand-over is the spec.
    answered = ["route\trouter" if line.startswith("route\trouter") else line for line in answered]
    assert answered == expected


def test_the_snapshot_carries_the_draw_parameters_of_routing_py():
    from services.router import routing

    draw = snapshot(table(), []).draw
    assert draw.sequence_step == routing.SPLIT_STEP and draw.salt == routing.SPLIT_SALT
    assert draw.key_separator == routing.KEY_SEPARATOR and draw.key_hash == fastpath_pb2.KEY_HASH_BLAKE2B_64
    assert routing.KEY_DIGEST_BYTES == 8  # what KEY_HASH_BLAKE2B_64 names
