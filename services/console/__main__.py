"""maas-console: serve the web console (python -m services.console --help)."""

from __future__ import annotations

from services.console.config import load_config
from services.console.server import run


def main(argv: list[str] | None = None) -> None:
    run(load_config(argv))


if __name__ == "__main__":
    main()
