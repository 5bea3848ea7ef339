"""The whole mesh with TLS (`maas up --tls`): every hop mTLS, real processes and real Triton.

Who gets in (plaintext, a wrong CA, no client certificate: refused), what works (MeshClient, the
registry, an unmodified tritonclient with ssl=True on both router ports, the `maas` CLI with --tls,
HTTPS of the OpenAI gateway), rotation of a certificate file without restart, the expiry metric, and
Triton's renewal, which reaches it through a restart by `maas up`'s supervisor (Triton has no reload).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from maas.cli.mesh import cat_photo
from maas.client import MeshClient, MeshError
from maas.local.certs import CLIENT, LocalPki
from maas.local.mesh import FREE_PORTS, SOURCE_MODELS, LocalMesh, MeshConfig
from maas.local.supervisor import RestartPolicy, Supervisor
from maas.registry_client import RegistryClient
from maas.tls import ClientTls
from services.router.fastpath import find_binary
from tests.fixtures.mesh import register_tiny

REPO = Path(__file__).resolve().parents[2]
MAAS = [sys.executable, "-c", "import sys; from maas.cli import main; sys.argv[0] = 'maas'; main()"]
MODELS = tuple(m for m in SOURCE_MODELS if m.name in ("minilm", "efficientnet_lite0"))


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory):
    subprocess.run([sys.executable, str(REPO / "tools" / "build_models.py")], check=True, cwd=REPO)
    local = LocalMesh(
        MeshConfig(state_dir=tmp_path_factory.mktemp("tls-mesh"), ports=FREE_PORTS, models=MODELS, tls=True)
    )
    with local:
        yield local


@pytest.fixture(scope="module")
def pki(tls_mesh) -> LocalPki:
    return LocalPki(tls_mesh.tls_dir)


@pytest.fixture(scope="module")
def registry(tls_mesh):
    with RegistryClient(tls_mesh.registry_address, timeout=30, tls=tls_mesh.client_tls) as client:
        yield client


@pytest.fixture(scope="module")
def tiny(registry, tmp_path_factory) -> str:
    """A y = 2x model registered through the registry (its loads go to Triton over mTLS)."""
    register_tiny(registry, "tlsprobe", tmp_path_factory.mktemp("tiny"), 2.0)
    return "tlsprobe"


def triton_client(address: str, pki: LocalPki, client_cert: bool = True) -> grpcclient.InferenceServerClient:
    """An unmodified tritonclient: ssl=True with the root certificate (and the client pair)."""
    extra = {"private_key": str(pki.key(CLIENT)), "certificate_chain": str(pki.cert(CLIENT))} if client_cert else {}
    return grpcclient.InferenceServerClient(address, ssl=True, root_certificates=str(pki.ca), **extra)


def tiny_infer(client: grpcclient.InferenceServerClient, model: str) -> np.ndarray:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], client_timeout=30).as_numpy("y")


def served_serial(address: str, pki: LocalPki) -> int:
    """Serial of the certificate a new connection to `address` is served (a raw TLS handshake)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.cert(CLIENT)), str(pki.key(CLIENT)))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number


def health_status(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_every_hop_serves_a_caller_with_the_client_certificate(tls_mesh):
    """Embed: router → tokenizer → Triton; Classify: router → vision → Triton; all over mTLS."""
    with MeshClient(tls_mesh.router_address, tls=tls_mesh.client_tls) as client:
        embeddings = client.embed(["hello", "world"], model="minilm")
        assert embeddings.vectors.shape == (2, 384)
        top = client.classify([cat_photo()], top_k=1).results[0][0]
        assert "cat" in top.label, top


@pytest.mark.parametrize("service", ["router", "registry", "tokenizer", "vision"])
def test_plaintext_caller_is_refused(tls_mesh, service):
    with pytest.raises(grpc.RpcError) as caught:
        health_status(tls_mesh.addresses[service], None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_tritonclient_is_refused_by_triton(tls_mesh):
    with grpcclient.InferenceServerClient(tls_mesh.addresses["triton"]) as client:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=5)


def test_wrong_ca_is_refused(tls_mesh, pki, tmp_path):
    other = LocalPki(tmp_path / "other").ensure([])
    with MeshClient(tls_mesh.router_address, tls=ClientTls(other.ca, pki.cert(CLIENT), pki.key(CLIENT))) as client:
        with pytest.raises(MeshError) as caught:
            client.embed(["hello"], timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_missing_client_certificate_is_refused_when_required(tls_mesh, pki):
    with MeshClient(tls_mesh.router_address, tls=ClientTls(root_cert=pki.ca)) as client:
        with pytest.raises(MeshError) as caught:
            client.embed(["hello"], timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    # A client certificate of another CA is no better.
    other = LocalPki(pki.directory.parent / "stranger").ensure([])
    with pytest.raises(grpc.RpcError):
        health_status(tls_mesh.router_address, ClientTls(pki.ca, other.cert(CLIENT), other.key(CLIENT)).credentials())


@pytest.mark.parametrize("port", ["router", "router_oip_fast"])
def test_tritonclient_with_ssl_works_through_the_router(tls_mesh, pki, tiny, port):
    if port == "router_oip_fast" and not find_binary():
        pytest.skip("maas-oip-fastpath not built (make fastpath)")
    with triton_client(tls_mesh.addresses[port], pki) as client:
        assert client.is_server_ready(client_timeout=10)
        assert client.is_model_ready(tiny, client_timeout=10)
        np.testing.assert_allclose(tiny_infer(client, tiny), [[0, 2, 4, 6]])
        np.testing.assert_allclose(tiny_infer(client, "tlsprobe"), [[0, 2, 4, 6]])
    with triton_client(tls_mesh.addresses[port], pki, client_cert=False) as client:  # required: refused
        with pytest.raises(InferenceServerException):
            client.is_server_ready(client_timeout=5)


def test_registry_over_tls(registry):
    assert {"minilm", "efficientnet_lite0"} <= {m.name for m in registry.list_models()}


def test_rotation_is_picked_up_without_restart(tls_mesh, pki, tiny):
    """A new router certificate in place: new connections to both router ports get its serial, the
    router process is the same, and calls go on working."""
    pid = tls_mesh.processes["router"].pid
    before = served_serial(tls_mesh.router_address, pki)
    rotated = pki.issue("router").serial_number
    assert rotated != before
    assert served_serial(tls_mesh.router_address, pki) == rotated
    if find_binary():  # the compiled data path watches the same files (re-read every second)
        deadline = time.monotonic() + 10
        while served_serial(tls_mesh.addresses["router_oip_fast"], pki) != rotated:
            assert time.monotonic() < deadline, "the fast path did not serve the rotated certificate"
            time.sleep(0.2)
        with triton_client(tls_mesh.addresses["router_oip_fast"], pki) as client:
            np.testing.assert_allclose(tiny_infer(client, tiny), [[0, 2, 4, 6]])
    with MeshClient(tls_mesh.router_address, tls=tls_mesh.client_tls) as client:
        assert client.embed(["after rotation"]).vectors.shape == (1, 384)
    assert tls_mesh.processes["router"].pid == pid and tls_mesh.alive()["router"]


def test_certificate_expiry_is_in_the_metrics(tls_mesh, pki):
    served = x509.load_pem_x509_certificate(pki.cert("tokenizer").read_bytes())
    text = (
        urllib.request.urlopen(f"http://{tls_mesh.metrics_addresses['tokenizer']}/metrics", timeout=5).read().decode()
    )
    lines = [line for line in text.splitlines() if line.startswith("maas_tls_certificate_expiry_seconds{")]
    assert len(lines) == 1 and 'service="tokenizer"' in lines[0] and format(served.serial_number, "x") in lines[0]
    left = float(lines[0].rsplit(" ", 1)[1])
    assert abs(left - (served.not_valid_after_utc.timestamp() - time.time())) < 120


def test_openai_gateway_serves_https(tls_mesh, pki):
    assert tls_mesh.openai_url.startswith("https://")
    context = ssl.create_default_context(cafile=str(pki.ca))
    with urllib.request.urlopen(f"{tls_mesh.openai_url}/models", timeout=10, context=context) as response:
        models = {m["id"] for m in json.load(response)["data"]}
    assert "minilm" in models
    with pytest.raises(urllib.error.URLError):  # an HTTPS client that does not trust the CA
        urllib.request.urlopen(f"{tls_mesh.openai_url}/models", timeout=10)


def test_maas_cli_with_tls(tls_mesh):
    state = str(tls_mesh.state_dir)
    ok = subprocess.run(
        [*MAAS, "--tls", "--tls-state-dir", state, "embed", "hello", "--router", tls_mesh.router_address, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(json.loads(ok.stdout)["embeddings"][0]) == 384
    listed = subprocess.run(
        [*MAAS, "--tls", "--tls-state-dir", state, "models", "list", "--registry", tls_mesh.registry_address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert listed.returncode == 0 and "minilm" in listed.stdout, listed.stderr[-2000:]
    plain = subprocess.run(
        [*MAAS, "embed", "hello", "--router", tls_mesh.router_address, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert plain.returncode != 0 and "UNAVAILABLE" in (plain.stdout + plain.stderr)


def _until(check, timeout: float, what: str):
    """check()'s first truthy value; connection errors (Triton restarting) count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, MeshError, grpc.RpcError, InferenceServerException):
            pass
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f}s"
        time.sleep(0.2)


def test_a_renewed_triton_certificate_reaches_triton_through_a_supervised_restart(tls_mesh, pki, tiny, tmp_path):
    """Triton reads its certificate at start only: the supervisor restarts it when the files change, once
    the key matches the certificate (a half-done renewal waits), and new connections get the new
    certificate; the registry re-loads the models and calls work again. (Last in this module: it restarts
    the module's Triton.)"""
    messages: list[str] = []
    waiting = threading.Event()

    def log(message: str) -> None:
        messages.append(message)
        if "not usable yet" in message:
            waiting.set()

    supervisor = Supervisor(tls_mesh, RestartPolicy(poll_interval=0.2), log=log)
    supervisor.start()
    try:
        triton = tls_mesh.addresses["triton"]
        before, pid = served_serial(triton, pki), tls_mesh.triton.process.pid
        # A half-done renewal: a new key, the old certificate. Not restarted on it.
        stranger = LocalPki(tmp_path / "stranger").ensure(["triton"])
        pki.key("triton").write_bytes(stranger.key("triton").read_bytes())
        assert waiting.wait(30), messages
        assert tls_mesh.triton.process.pid == pid and served_serial(triton, pki) == before
        rotated = pki.issue("triton").serial_number  # the renewal completed: key and certificate
        _until(lambda: served_serial(triton, pki) == rotated, 120, "Triton serving the renewed certificate")
        _until(lambda: supervisor.status["triton"].restarts == 1, 120, "the supervisor's restart done")
        assert tls_mesh.triton.process.pid != pid
        assert supervisor.status["triton"].last_exit == "restarted: certificate files changed", messages
        # Healed: the registry re-loaded the live versions, the router and a direct tritonclient are served.
        with MeshClient(tls_mesh.router_address, tls=tls_mesh.client_tls, timeout=10) as client:
            _until(lambda: client.embed(["renewed"]).vectors.shape == (1, 384), 120, "embed after the restart")
        with triton_client(triton, pki) as client:
            _until(lambda: tiny_infer(client, tiny).tolist() == [[0, 2, 4, 6]], 120, "tiny on Triton directly")
    finally:
        supervisor.stop()
