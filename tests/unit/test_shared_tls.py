"""TLS of the shared server bootstrap and channels (services/shared/tls.py), with certificates from
maas/local/certs.py: who gets in, rotation without restart, the expiry metric, the settings."""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import time

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from maas.local.certs import CLIENT, LocalPki
from maas.tls import ClientTls
from services.shared.channels import open_channel
from services.shared.config import ConfigError, ServerSettings, add_server_arguments, server_settings
from services.shared.server import build_server
from services.shared.tls import TlsSettings


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return LocalPki(tmp_path_factory.mktemp("tls")).ensure(["probe", "peer"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return LocalPki(tmp_path_factory.mktemp("other-ca")).ensure(["probe"])


def tls_settings(pki: LocalPki, name: str = "probe", client_auth: str = "required") -> TlsSettings:
    return TlsSettings(cert=pki.cert(name), key=pki.key(name), ca=pki.ca, client_auth=client_auth)


async def started(settings: ServerSettings):
    server, port = build_server(settings, lambda s: [])
    await server.start()
    return server, port


async def health(channel: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def client_channel(address: str, tls: ClientTls) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, tls.credentials())


def served_serial(port: int, pki: LocalPki) -> int:
    """The serial of the certificate a new TLS connection is served (a raw handshake, ALPN h2)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.cert(CLIENT)), str(pki.key(CLIENT)))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number


@pytest.fixture
async def tls_server(pki):
    server, port = await started(
        ServerSettings("probe", "127.0.0.1:0", tls=tls_settings(pki), health_listen="127.0.0.1:0")
    )
    try:
        yield server, port
    finally:
        await server.stop(0)


async def test_mtls_client_is_served(tls_server, pki):
    _, port = tls_server
    tls = ClientTls(root_cert=pki.ca, client_cert=pki.cert(CLIENT), client_key=pki.key(CLIENT))
    async with client_channel(f"127.0.0.1:{port}", tls) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_peer_channel_of_a_service_is_served(tls_server, pki):
    """open_channel with a service's own settings: the hop between services (mTLS)."""
    _, port = tls_server
    async with open_channel(f"localhost:{port}", tls=tls_settings(pki, "peer")) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", ["plaintext", "wrong CA", "no client certificate", "client certificate of another CA"])
async def test_refused(tls_server, pki, other_pki, case):
    _, port = tls_server
    address = f"127.0.0.1:{port}"
    channel = {
        "plaintext": lambda: grpc.aio.insecure_channel(address),
        "wrong CA": lambda: client_channel(address, ClientTls(other_pki.ca, pki.cert(CLIENT), pki.key(CLIENT))),
        "no client certificate": lambda: client_channel(address, ClientTls(pki.ca)),
        "client certificate of another CA": lambda: client_channel(
            address, ClientTls(pki.ca, other_pki.cert(CLIENT), other_pki.key(CLIENT))
        ),
    }[case]()
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_optional_client_auth_takes_tls_without_client_certificate(pki):
    server, port = await started(ServerSettings("probe", "127.0.0.1:0", tls=tls_settings(pki, client_auth="optional")))
    try:
        async with client_channel(f"127.0.0.1:{port}", ClientTls(pki.ca)) as channel:
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health(channel)
    finally:
        await server.stop(0)


async def test_health_only_port_is_plaintext_and_follows_draining(tls_server):
    server, _ = tls_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
        await server.health.enter_graceful_shutdown()
        assert await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_rotation_is_served_to_new_connections_without_restart(tmp_path):
    pki = LocalPki(tmp_path).ensure(["probe"])
    server, port = await started(ServerSettings("probe", "127.0.0.1:0", tls=tls_settings(pki)))
    try:
        first = await asyncio.to_thread(served_serial, port, pki)
        assert first == x509.load_pem_x509_certificate(pki.cert("probe").read_bytes()).serial_number
        rotated = pki.issue("probe")
        assert rotated.serial_number != first
        assert await asyncio.to_thread(served_serial, port, pki) == rotated.serial_number
        assert server.certificates.serial == format(rotated.serial_number, "x")
        tls = ClientTls(root_cert=pki.ca, client_cert=pki.cert(CLIENT), client_key=pki.key(CLIENT))
        async with client_channel(f"127.0.0.1:{port}", tls) as channel:
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_a_half_written_rotation_keeps_the_previous_certificate(tmp_path):
    pki = LocalPki(tmp_path).ensure(["probe"])
    server, port = await started(ServerSettings("probe", "127.0.0.1:0", tls=tls_settings(pki)))
    try:
        first = await asyncio.to_thread(served_serial, port, pki)
        good_cert = pki.cert("probe").read_bytes()
        pki.issue("other")
        pki.key("probe").write_bytes(pki.key("other").read_bytes())  # a new key, the old certificate
        assert await asyncio.to_thread(served_serial, port, pki) == first
        pki.cert("probe").write_bytes(pki.cert("other").read_bytes())  # now the pair matches again
        assert await asyncio.to_thread(served_serial, port, pki) != first
        assert good_cert != pki.cert("probe").read_bytes()
    finally:
        await server.stop(0)


async def test_expiry_of_the_served_certificate_is_a_metric(tmp_path):
    pki = LocalPki(tmp_path).ensure(["probe"])
    server, port = await started(ServerSettings("expiry-probe", "127.0.0.1:0", tls=tls_settings(pki)))
    try:
        cert = x509.load_pem_x509_certificate(pki.cert("probe").read_bytes())
        labels = {
            "service": "expiry-probe",
            "subject": cert.subject.rfc4514_string(),
            "serial": format(cert.serial_number, "x"),
        }
        left = REGISTRY.get_sample_value("maas_tls_certificate_expiry_seconds", labels)
        assert left == pytest.approx(cert.not_valid_after_utc.timestamp() - time.time(), abs=60)
        rotated = pki.issue("probe", days=2)
        await asyncio.to_thread(served_serial, port, pki)  # a handshake makes gRPC fetch the new files
        assert REGISTRY.get_sample_value("maas_tls_certificate_expiry_seconds", labels) is None  # old one gone
        labels["serial"] = format(rotated.serial_number, "x")
        assert REGISTRY.get_sample_value("maas_tls_certificate_expiry_seconds", labels) == pytest.approx(
            2 * 86400, abs=600
        )
    finally:
        await server.stop(0)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, "127.0.0.1:0")
    return server_settings("probe", parser.parse_args(argv))


def test_settings_from_flags(pki):
    settings = parse(
        [
            "--tls-cert",
            str(pki.cert("probe")),
            "--tls-key",
            str(pki.key("probe")),
            "--tls-ca",
            str(pki.ca),
            "--tls-client-auth",
            "optional",
        ]
    )
    assert settings.tls == TlsSettings(pki.cert("probe"), pki.key("probe"), pki.ca, "optional")
    assert parse([]).tls is None


def test_settings_from_environment(pki, monkeypatch):
    monkeypatch.setenv("MAAS_TLS_CERT", str(pki.cert("probe")))
    monkeypatch.setenv("MAAS_TLS_KEY", str(pki.key("probe")))
    monkeypatch.setenv("MAAS_TLS_CA", str(pki.ca))
    monkeypatch.setenv("MAAS_TLS_SERVER_NAME", "maas-router")
    settings = parse([])
    assert settings.tls.client_auth == "required" and settings.tls.server_name == "maas-router"


def test_incomplete_or_missing_files_name_what(pki, tmp_path):
    with pytest.raises(ConfigError, match="--tls-key / MAAS_TLS_KEY, --tls-ca / MAAS_TLS_CA not set"):
        parse(["--tls-cert", str(pki.cert("probe"))])
    with pytest.raises(ConfigError, match=f"--tls-ca / MAAS_TLS_CA: {tmp_path / 'nope.pem'} is not a readable file"):
        parse(
            [
                "--tls-cert",
                str(pki.cert("probe")),
                "--tls-key",
                str(pki.key("probe")),
                "--tls-ca",
                str(tmp_path / "nope.pem"),
            ]
        )


def test_local_pki_names_loopback_and_the_component_and_keeps_good_files(tmp_path):
    pki = LocalPki(tmp_path).ensure(["router"])
    cert = x509.load_pem_x509_certificate(pki.cert("router").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "router", "maas-router"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "::1"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usages} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}  # server + client auth
    before = pki.cert("router").read_bytes()
    LocalPki(tmp_path).ensure(["router"])
    assert pki.cert("router").read_bytes() == before
    assert (pki.key("router").stat().st_mode & 0o777) == 0o600
