"""The `maas` command: `maas models ...` (registry), `maas up|demo|embed|classify|generate|chat` (mesh)."""

from __future__ import annotations

import typer

from maas.cli import generate, mesh, models

app = typer.Typer(help="MaaS Mesh: model-as-a-service on Triton.", no_args_is_help=True, add_completion=False)
app.add_typer(models.app, name="models", help="Register, list and route model versions (the registry).")
mesh.register(app)
generate.register(app)


def main() -> None:
    app()


def kubectl_main() -> None:
    """`kubectl maas ...`: the same commands, reaching the registry through the cluster (see maas.cli.kubectl)."""
    from maas.cli import kubectl

    kubectl.main()
