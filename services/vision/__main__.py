"""maas-vision: serve the Vision gRPC API (python -m services.vision --help)."""

from __future__ import annotations

from services.shared.server import run
from services.vision.config import load_config
from services.vision.server import create_server


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(argv)
    run(cfg.server, lambda: create_server(cfg))


if __name__ == "__main__":
    main()
