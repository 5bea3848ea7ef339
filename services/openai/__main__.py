"""maas-openai: serve the OpenAI-compatible HTTP API in front of the router (python -m services.openai --help)."""

from __future__ import annotations

from services.openai.config import load_config
from services.openai.server import run


def main(argv: list[str] | None = None) -> None:
    run(load_config(argv))


if __name__ == "__main__":
    main()
