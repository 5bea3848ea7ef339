"""`maas up|demo|embed|classify` — owned by the router work; placeholder until it lands."""
import typer


def register(app: typer.Typer) -> None:
    pass
