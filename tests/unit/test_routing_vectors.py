"""The routing spec's shared vectors (tests/fixtures/routing_vectors.json, protos/maas/v1/fastpath.proto):
the Python router (routing.py, replica_pool.py, peers.py, admission.py) and the compiled fast path (its
--check-vectors mode, fed the snapshot fastpath.py computes from the same routing table and tenant cache)
give the same answers, refusals word for word."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import grpc
import pytest

from tritonclient.grpc import service_pb2

from maas.v1 import fastpath_pb2, registry_pb2
from services.router import wire
from services.router.admission import Admission, AdmissionSettings
from services.router.fastpath import find_binary, snapshot
from services.router.peers import retry_reason
from services.router.routing import ModelRoutes, RoutingTable, ServingState, Shadow, Target, VersionInfo
from services.router.tenants import TenantCache
from services.router.triton_errors import NOT_SERVING_MARKER
from services.shared.errors import ServiceError
from services.shared.replica_pool import less_busy_of_two

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "routing_vectors.json").read_text())
ROUTES, REPLICAS, RETRIES = VECTORS["routes"], VECTORS["replicas"], VECTORS["retries"]
TENANTS, AUTHS = VECTORS["auth"]["tenants"], VECTORS["auth"]["cases"]


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


def admission(case: dict) -> Admission:
    """The main port's admission of an auth case: the vectors' tenants (unless not synced yet), shedding
    thresholds when the case says the router sheds."""
    cache = TenantCache()
    if case.get("synced", True):
        cache.apply(
            registry_pb2.TenantsEvent(
                revision=1,
                routers=1,
                tenants=[
                    registry_pb2.TenantAuth(
                        key_sha256=hashlib.sha256(t["key"].encode()).hexdigest(),
                        tenant=registry_pb2.Tenant(
                            name=t["name"],
                            revoked=t.get("revoked", False),
                            allowed_models=t.get("allowed", []),
                            quota=registry_pb2.Quota(**t.get("quota", {})),
                            priority=registry_pb2.Priority.Value(f"PRIORITY_{t.get('priority', 'standard').upper()}"),
                        ),
                    )
                    for t in TENANTS
                ],
            )
        )
    sheds = 100 if case.get("sheds") else 0
    return Admission(AdmissionSettings(auth=True, shed_sheddable_inflight=sheds, shed_standard_inflight=sheds), cache)


def infer_request(case: dict) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=case["model"], model_version=case["version"])
    request.inputs.add(name="x", datatype="FP32", shape=case.get("shape", [2, 4]))
    return request.SerializeToString()


def python_admit(case: dict) -> tuple[dict, str]:
    """The main port's answer to an auth case (servicer.InferenceServicer._admit_raw): the admitted tenant,
    or the error's code and message."""
    try:
        name, version = wire.read_model_ref(infer_request(case))
        ticket = admission(case).admit(case["metadata"], "ModelInfer", name, *version_selector(version))
    except ServiceError as exc:
        return {"error": exc.code.name}, exc.message
    return {"tenant": ticket.tenant.name}, ""  # type: ignore[union-attr]


def fast_admit_expected(case: dict) -> str:
    """The forwarder's line for an auth case: the main port's refusal, word for word, where it refuses."""
    expect = case["expect"]
    if expect["fast"] == "refuse":
        got, message = python_admit(case)
        code = grpc.StatusCode[got["error"]].value[0]
        return f"refuse\t{code}\t{expect['reason']}\t{message}"
    if expect["fast"] == "serve":
        return f"serve\t{expect['tenant']}\t{expect['cost']}"
    return "router"


@pytest.mark.parametrize("case", AUTHS, ids=[c["about"] for c in AUTHS])
def test_python_admits_as_the_vectors_say(case):
    got, _ = python_admit(case)
    assert got == {k: v for k, v in case["expect"].items() if k in ("error", "tenant")}


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
        auths=[
            fastpath_pb2.AuthCase(
                snapshot=snapshot(routing, ["a:8001"], admission(c)),
                request=infer_request(c),
                metadata=[fastpath_pb2.Metadata(key=k, value=v) for k, v in c["metadata"]],
            )
            for c in AUTHS
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
        *(f"auth\t{fast_admit_expected(c)}" for c in AUTHS),
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
