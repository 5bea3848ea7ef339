"""TLS for callers of the mesh: MeshClient, AsyncMeshClient, RegistryClient and the `maas` CLI.

    MeshClient("127.0.0.1:50051", tls=ClientTls(root_cert=".maas/tls/ca.pem",
               client_cert=".maas/tls/client.pem", client_key=".maas/tls/client.key"))

With no `tls` given, the clients read MAAS_TLS_ROOT_CERT, MAAS_TLS_CLIENT_CERT, MAAS_TLS_CLIENT_KEY
(and MAAS_TLS_SERVER_NAME) from the environment: none set = plaintext. `maas up --tls` prints them.
The client certificate is needed when the router requires one (MAAS_TLS_CLIENT_AUTH=required).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV = {
    "root_cert": "MAAS_TLS_ROOT_CERT",
    "client_cert": "MAAS_TLS_CLIENT_CERT",
    "client_key": "MAAS_TLS_CLIENT_KEY",
    "server_name": "MAAS_TLS_SERVER_NAME",
}


class TlsConfigError(ValueError):
    """A TLS option is inconsistent or a file cannot be read; the message names which."""


@dataclass(frozen=True)
class ClientTls:
    root_cert: str | os.PathLike | None = None  # PEM CA to trust; None = the system's roots
    client_cert: str | os.PathLike | None = None  # presented when the server asks (mTLS)
    client_key: str | os.PathLike | None = None
    server_name: str | None = None  # name checked in the server's certificate instead of the address's host

    @classmethod
    def from_env(cls, environ=None) -> "ClientTls | None":
        environ = os.environ if environ is None else environ
        values = {field: environ.get(name) or None for field, name in ENV.items()}
        if not any(values[f] for f in ("root_cert", "client_cert", "client_key")):
            return None
        return cls(**values)

    def _read(self, path, what: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise TlsConfigError(f"TLS {what} {path}: {exc.strerror or exc}") from None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.client_cert) != bool(self.client_key):
            raise TlsConfigError(
                "a client certificate needs both the certificate and its key "
                "(--tls-client-cert / MAAS_TLS_CLIENT_CERT and --tls-client-key / MAAS_TLS_CLIENT_KEY)"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.root_cert, "root certificate"),
            private_key=self._read(self.client_key, "client key"),
            certificate_chain=self._read(self.client_cert, "client certificate"),
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def resolve(tls: "ClientTls | bool | None") -> ClientTls | None:
    """None → from the environment; False → plaintext; True → TLS with the system's roots."""
    if tls is None:
        return ClientTls.from_env()
    if tls is False:
        return None
    if tls is True:
        return ClientTls.from_env() or ClientTls()
    return tls


def open_channel(address: str, options: list, tls: "ClientTls | bool | None" = None, aio: bool = False):
    """A blocking (or grpc.aio) channel: TLS when `tls` resolves to settings, else plaintext."""
    module = grpc.aio if aio else grpc
    settings = resolve(tls)
    if settings is None:
        return module.insecure_channel(address, options=options)
    return module.secure_channel(address, settings.credentials(), options=[*options, *settings.options()])
