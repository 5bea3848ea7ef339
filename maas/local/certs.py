"""A local CA and per-component certificates for `maas up --tls` (with `cryptography`, no openssl).

    pki = LocalPki(state_dir / "tls").ensure(["router", "registry", ...])
    pki.ca            # ca.pem: what clients trust (maas --tls-root-cert, tritonclient root_certificates)
    pki.cert("router"), pki.key("router")

Each component's certificate names localhost, 127.0.0.1, ::1 and the component (its name and
maas-<name>), and carries both serverAuth and clientAuth: the same pair is served and presented to
peers (mTLS). `client` is a certificate for callers (the CLI, tests). Files are kept across starts
and re-issued when missing, expiring within a day, or not signed by the CA on disk; `issue()`
re-issues one at once (tests rotate with it: a new serial in place, the running servers pick it up).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 397
RENEW_BEFORE = dt.timedelta(days=1)
CLIENT = "client"  # the callers' certificate (maas CLI, tests)
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Atomically (a server re-reading the file never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_ca(common_name: str = "MaaS Mesh local CA", days: int = CA_DAYS):
    """(certificate, key) of a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def new_leaf(
    ca_cert,
    ca_key,
    common_name: str,
    dns_names: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = LEAF_DAYS,
    not_before: dt.datetime | None = None,
):
    """(certificate, key) signed by the CA, for both TLS server and client authentication."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    sans = [
        *(x509.DNSName(n) for n in dict.fromkeys(dns_names)),
        *(x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)),
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


class LocalPki:
    """ca.pem / ca.key and <name>.pem / <name>.key under one folder."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def _load_ca(self):
        cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        return cert, key

    def ensure(self, names: Iterable[str]) -> "LocalPki":
        """The CA and a certificate for each name (plus `client`), kept when still good."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        try:
            ca_cert, _ = self._load_ca()
            fresh_ca = ca_cert.not_valid_after_utc - _now() < RENEW_BEFORE
        except (OSError, ValueError):
            fresh_ca = True
        if fresh_ca:
            ca_cert, ca_key = new_ca()
            _write(self.ca_key, _key_pem(ca_key), private=True)
            _write(self.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
        for name in dict.fromkeys([*names, CLIENT]):
            if fresh_ca or not self._good(name, ca_cert):
                self.issue(name)
        return self

    def _good(self, name: str, ca_cert) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(self.cert(name).read_bytes())
            serialization.load_pem_private_key(self.key(name).read_bytes(), password=None)
        except (OSError, ValueError):
            return False
        return cert.issuer == ca_cert.subject and cert.not_valid_after_utc - _now() > RENEW_BEFORE

    def issue(self, name: str, days: int = LEAF_DAYS, extra_dns: Iterable[str] = ()) -> x509.Certificate:
        """A new certificate for `name` in place (key first, then certificate: each write is atomic,
        and a server re-reading the pair between the two writes keeps its previous one)."""
        ca_cert, ca_key = self._load_ca()
        cert, key = new_leaf(
            ca_cert,
            ca_key,
            f"maas-{name}",
            dns_names=[*LOOPBACK_NAMES, name, f"maas-{name}", *extra_dns],
            ips=LOOPBACK_IPS,
            days=days,
        )
        _write(self.key(name), _key_pem(key), private=True)
        _write(self.cert(name), cert.public_bytes(serialization.Encoding.PEM))
        return cert
