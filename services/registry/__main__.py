"""`maas-registry` / `python -m services.registry`."""

from __future__ import annotations

import sys

from services.registry.config import load_config
from services.registry.server import create_server
from services.shared.server import run


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    run(cfg.server, lambda: create_server(cfg))


if __name__ == "__main__":
    main()
