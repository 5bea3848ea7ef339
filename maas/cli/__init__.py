"""The `maas` command: `maas models ...` / `maas tenants ...` / `maas audit` (registry),
`maas up|demo|embed|classify|generate|chat` (mesh)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from maas.cli import generate, mesh, models, tenants

app = typer.Typer(help="MaaS Mesh: model-as-a-service on Triton.", no_args_is_help=True, add_completion=False)


@app.callback()
def tls_options(
    tls: bool = typer.Option(
        False,
        "--tls",
        help="call the mesh over TLS; without the options below, with the "
        "CA and client certificate of `maas up --tls` (<state-dir>/tls)",
    ),
    root_cert: Optional[Path] = typer.Option(
        None, "--tls-root-cert", envvar="MAAS_TLS_ROOT_CERT", help="PEM CA the servers' certificates chain to"
    ),
    client_cert: Optional[Path] = typer.Option(
        None,
        "--tls-client-cert",
        envvar="MAAS_TLS_CLIENT_CERT",
        help="PEM client certificate (when the router requires one)",
    ),
    client_key: Optional[Path] = typer.Option(
        None, "--tls-client-key", envvar="MAAS_TLS_CLIENT_KEY", help="its PEM private key"
    ),
    state_dir: Path = typer.Option(
        Path(".maas"),
        "--tls-state-dir",
        envvar="MAAS_STATE_DIR",
        help="where `maas up --tls` keeps its certificates (tls/ in it)",
    ),
) -> None:
    """Every client the commands open (MeshClient, RegistryClient) reads MAAS_TLS_* (maas/tls.py):
    the options are handed to them through the environment of this process."""
    if tls and not (root_cert or client_cert or client_key):
        local = state_dir / "tls"
        root_cert, client_cert, client_key = local / "ca.pem", local / "client.pem", local / "client.key"
        if not root_cert.is_file():
            raise typer.BadParameter(
                f"{root_cert} not found: start the mesh with `maas up --tls` or give --tls-root-cert",
                param_hint="--tls",
            )
    for name, value in (
        ("MAAS_TLS_ROOT_CERT", root_cert),
        ("MAAS_TLS_CLIENT_CERT", client_cert),
        ("MAAS_TLS_CLIENT_KEY", client_key),
    ):
        if value:
            os.environ[name] = str(value)


app.add_typer(models.app, name="models", help="Register, list and route model versions (the registry).")
mesh.register(app)
generate.register(app)
tenants.register(app)


def main() -> None:
    app()


def kubectl_main() -> None:
    """`kubectl maas ...`: the same commands, reaching the registry through the cluster (see maas.cli.kubectl)."""
    from maas.cli import kubectl

    kubectl.main()
