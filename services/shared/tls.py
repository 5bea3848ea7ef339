"""Transport security for every gRPC hop: server credentials that follow their files, client (mTLS)
credentials for outgoing channels, and the served certificate's expiry as a metric.

One `TlsSettings` per process (services/shared/config.py reads it: --tls-cert/MAAS_TLS_CERT, --tls-key/
MAAS_TLS_KEY, --tls-ca/MAAS_TLS_CA, --tls-client-auth/MAAS_TLS_CLIENT_AUTH, --tls-server-name/
MAAS_TLS_SERVER_NAME). The same certificate and key are what the service serves and what it presents
to its peers (tokenizer, vision, registry, Triton): locally `maas up --tls` issues one per service with
both serverAuth and clientAuth usages (maas/local/certs.py); the chart mounts cert-manager's.

Rotation without restart: the server credentials are gRPC's dynamic ones; before each new handshake
gRPC asks `CertificateFiles.fetch()`, which re-reads the three files only when one's mtime (or size)
changed, so a renewed certificate is served to new connections at once (existing connections keep
theirs until they close). Outgoing channels read the files when they are opened; a peer keeps
accepting the old client certificate as long as it is valid under the CA, which cert-manager renews
well before expiry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import Gauge

log = logging.getLogger(__name__)

CLIENT_AUTH_MODES = ("required", "optional")

CERT_EXPIRY = Gauge(
    "maas_tls_certificate_expiry_seconds",
    "Seconds until the served TLS certificate's notAfter (negative once expired); follows rotation",
    ["service", "subject", "serial"],
)


@dataclass(frozen=True)
class TlsSettings:
    """Where the PEM files are and how peers are checked. cert+key are served and presented to peers;
    ca verifies peers (server certificates of outgoing channels, client certificates when required)."""

    cert: Path
    key: Path
    ca: Path
    client_auth: str = "required"  # required: a client certificate signed by `ca` | optional: none asked
    # Name checked in peers' certificates instead of the host of the address (pod IPs, address lists).
    server_name: str | None = None

    def __post_init__(self):
        if self.client_auth not in CLIENT_AUTH_MODES:
            raise ValueError(f"client_auth must be one of {CLIENT_AUTH_MODES}, got {self.client_auth!r}")


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(f"TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsFileError(f"TLS {what} {path} is not PEM")
    return data


class TlsFileError(RuntimeError):
    """A certificate, key or CA file is missing or unreadable; the message names which."""


def certificate_info(pem: bytes, key_pem: bytes | None = None) -> tuple[str, str, float]:
    """(subject, serial as hex, notAfter as a UNIX time) of the first certificate of a PEM chain;
    with `key_pem`, checks that the key is the certificate's (TlsFileError if not)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise TlsFileError(f"TLS certificate is not a valid PEM certificate: {exc}") from None
    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsFileError(f"TLS key is not a valid unencrypted PEM private key: {exc}") from None
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
            raise TlsFileError("TLS key does not match the certificate")
    return cert.subject.rfc4514_string(), format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp()


class CertificateFiles:
    """The served certificate, its key and the CA, re-read when their files change."""

    def __init__(self, settings: TlsSettings, service: str = ""):
        self.settings = settings
        self.service = service
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._labels: tuple[str, str, str] | None = None
        self.serial = ""
        self.reloads = 0

    def _files_stamp(self) -> tuple:
        stamp = []
        for path in (self.settings.cert, self.settings.key, self.settings.ca):
            try:
                st = os.stat(path)
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Read the files now (start-up: errors are fatal and name the file)."""
        with self._lock:
            stamp = self._files_stamp()
            config = self._configuration()
            self._stamp = stamp
            return config

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        s = self.settings
        cert, key, ca = _read(s.cert, "certificate"), _read(s.key, "key"), _read(s.ca, "CA")
        subject, serial, not_after = certificate_info(cert, key)
        self._export_expiry(subject, serial, not_after)
        self.serial = serial
        self.reloads += 1
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _export_expiry(self, subject: str, serial: str, not_after: float) -> None:
        if self._labels is not None:
            try:
                CERT_EXPIRY.remove(*self._labels)
            except KeyError:
                pass
        self._labels = (self.service, subject, serial)
        CERT_EXPIRY.labels(*self._labels).set_function(lambda: not_after - time.time())

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called before new handshakes: a new configuration when a file changed, else
        None (keep the current one). A half-written or broken file keeps the current one too (logged);
        the next handshake tries again."""
        with self._lock:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return None
            try:
                config = self._configuration()
            except Exception as exc:  # noqa: BLE001 - a renewal in progress: serve the previous certificate
                log.warning(
                    "TLS files changed but could not be loaded, still serving the previous certificate",
                    extra={"error": str(exc), "cert": str(self.settings.cert)},
                )
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded", extra={"cert": str(self.settings.cert), "serial": self.serial})
            return config


def server_credentials(settings: TlsSettings, service: str = "") -> tuple[grpc.ServerCredentials, CertificateFiles]:
    """Dynamic server credentials (rotation without restart) and the file watcher behind them."""
    files = CertificateFiles(settings, service)
    initial = files.load()
    credentials = grpc.dynamic_ssl_server_credentials(
        initial, files.fetch, require_client_authentication=settings.client_auth == "required"
    )
    return credentials, files


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials:
    """mTLS for an outgoing channel: trust `ca`, present our certificate and key."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca, "CA"),
        private_key=_read(settings.key, "key"),
        certificate_chain=_read(settings.cert, "certificate"),
    )


def channel_options(settings: TlsSettings | None) -> list[tuple[str, str]]:
    """The target-name override for peers addressed by IP or list (their certificate names a service)."""
    if settings is None or not settings.server_name:
        return []
    return [("grpc.ssl_target_name_override", settings.server_name)]


def client_credentials(
    root_cert: str | os.PathLike | None,
    client_cert: str | os.PathLike | None = None,
    client_key: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """For callers (maas CLI, MeshClient, RegistryClient): trust `root_cert` (None = the system's
    roots), present a client certificate when both cert and key are given."""
    if bool(client_cert) != bool(client_key):
        raise TlsFileError("a client certificate needs both --tls-client-cert and --tls-client-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(Path(root_cert), "root certificate") if root_cert else None,
        private_key=_read(Path(client_key), "client key") if client_key else None,
        certificate_chain=_read(Path(client_cert), "client certificate") if client_cert else None,
    )


# -- HTTPS (the OpenAI gateway and the console, served by uvicorn) -------------------------------------


def uvicorn_ssl(settings: TlsSettings | None) -> dict:
    """uvicorn.Config keyword arguments serving HTTPS with these files ({} = plain HTTP)."""
    if settings is None:
        return {}
    import ssl

    return {
        "ssl_certfile": str(settings.cert),
        "ssl_keyfile": str(settings.key),
        "ssl_ca_certs": str(settings.ca),
        "ssl_cert_reqs": ssl.CERT_REQUIRED if settings.client_auth == "required" else ssl.CERT_NONE,
    }


class HttpsReloader:
    """Re-loads an ssl.SSLContext's certificate when its files change (new connections get the new
    one), polling their mtimes; exports the served certificate's expiry like the gRPC servers."""

    def __init__(self, context, settings: TlsSettings, service: str, interval: float = 1.0):
        self.context, self.settings, self.interval = context, settings, interval
        self.files = CertificateFiles(settings, service)
        self.files.load()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-reload", daemon=True)

    def start(self) -> "HttpsReloader":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.files.fetch() is not None:
                try:
                    self.context.load_cert_chain(str(self.settings.cert), str(self.settings.key))
                    self.context.load_verify_locations(str(self.settings.ca))
                except (OSError, ValueError) as exc:
                    log.warning("HTTPS certificate could not be reloaded", extra={"error": str(exc)})
