"""The whole mesh as real processes (tests.fixtures.mesh): the client API through the router, and the
router surviving its peers going away. The Triton-stop test restores the mesh, and runs last here."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from maas.cli.mesh import cat_photo
from maas.client import MeshClient, MeshError

TIMEOUT = 30


@pytest.fixture(scope="module")
def client(mesh):
    with MeshClient(mesh.router_address, timeout=TIMEOUT) as c:
        yield c


def test_embed_through_the_router(client):
    texts = [
        "A cat sits on the warm windowsill.",
        "A kitten sleeps in the sun by the window.",
        "Quarterly revenue grew by four percent.",
    ]
    result = client.embed(texts, "minilm")
    assert result.vectors.shape == (3, 384) and result.truncated == [False] * 3
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)
    similar, unrelated = result.vectors[0] @ result.vectors[1], result.vectors[0] @ result.vectors[2]
    assert similar > 0.4 and similar > unrelated + 0.3, (similar, unrelated)
    assert (result.routed.model, result.routed.kind, result.routed.target) == ("minilm", "default", "production")


def test_classify_the_cat_through_the_router(client):
    result = client.classify([cat_photo(), cat_photo()], "efficientnet_lite0", top_k=3)
    assert len(result.results) == 2 and all(len(r) == 3 for r in result.results)
    top = result.results[0][0]
    assert 281 <= top.index <= 285 and "cat" in top.label, top
    assert result.results[0] == result.results[1]
    scores = [c.score for c in result.results[0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


@pytest.mark.parametrize(
    "call,code",
    [
        (lambda c: c.embed(["x"], "no_such_model"), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.embed(["x"], "minilm", version=99), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.embed(["x"], "efficientnet_lite0"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.classify([b"not an image"], "efficientnet_lite0"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_say_what_was_wrong(client, call, code):
    with pytest.raises(MeshError) as err:
        call(client)
    assert err.value.code == code and err.value.details


def test_stopping_the_registry_does_not_stop_inference(mesh, client, mesh_registry):
    mesh.stop_component("registry")
    try:
        for _ in range(5):
            assert client.embed(["still serving"], "minilm").vectors.shape == (1, 384)
    finally:
        mesh.restart_component("registry")
    # The router reconnects and follows changes again: point a new alias at v1 and route by it.
    mesh_registry.set_alias("minilm", "after-restart", 1, reason="test reconnect")
    deadline = time.monotonic() + 20
    while True:
        try:
            assert client.embed(["x"], "minilm", alias="after-restart").routed.version == 1
            break
        except MeshError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_stopping_triton_gives_unavailable_within_the_deadline(mesh, client):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    mesh.stop_component("triton")
    try:
        started = time.monotonic()
        with pytest.raises(MeshError) as err:
            client.embed(["x"], "minilm", timeout=5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
        for port in ("router", "router_oip_fast"):  # the main port and the fast path
            with grpcclient.InferenceServerClient(mesh.addresses[port]) as oip:
                inp = grpcclient.InferInput("INPUT__0", [1, 3, 224, 224], "FP32")
                inp.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
                started = time.monotonic()
                with pytest.raises(InferenceServerException) as oip_err:
                    oip.infer("efficientnet_lite0", [inp], client_timeout=5)
                assert "UNAVAILABLE" in str(oip_err.value.status()) and time.monotonic() - started < 5, port
    finally:
        # Triton comes back empty; the registry re-loads every live version when it starts.
        mesh.restart_component("triton")
        mesh.stop_component("registry")
        mesh.restart_component("registry")
        mesh.wait_routable()
    assert client.embed(["back"], "minilm").vectors.shape == (1, 384)
