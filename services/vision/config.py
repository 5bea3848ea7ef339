"""Vision service settings: flags, then MAAS_* environment, then loopback defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from maas import ports
from services.shared.config import (
    ServerSettings,
    add_limit_arguments,
    add_server_arguments,
    env,
    limits_from_args,
    server_settings,
)
from services.shared.model_repository import add_model_repository_argument
from services.vision.pipeline import VisionLimits

DEFAULT_LISTEN = ports.loopback(ports.VISION)
DEFAULT_SPEC = "efficientnet_lite0"
LIMIT_HELP = {
    "max_batch": "images per request",
    "max_request_bytes": "encoded request size",
    "max_image_pixels": "width x height of one image, checked before decoding",
    "max_image_width": "width of one image in pixels, checked before decoding",
    "max_image_height": "height of one image in pixels, checked before decoding",
    "max_aspect_ratio": "longer side / shorter side of one image, checked before decoding",
}


@dataclass(frozen=True)
class VisionConfig:
    server: ServerSettings
    model_repository: Path
    spec_dir: Path | None  # extra <name>/preprocess.json tree, beside the model repository's
    default_spec: str
    limits: VisionLimits


def load_config(argv: list[str] | None = None) -> VisionConfig:
    parser = argparse.ArgumentParser(prog="maas-vision", description="MaaS Mesh vision preprocessing service")
    add_server_arguments(parser, DEFAULT_LISTEN)
    add_model_repository_argument(parser)
    parser.add_argument(
        "--spec-dir",
        type=Path,
        default=env("MAAS_VISION_SPEC_DIR"),
        help="extra directory of <name>/preprocess.json (MAAS_VISION_SPEC_DIR)",
    )
    parser.add_argument(
        "--default-spec",
        default=env("MAAS_VISION_DEFAULT_SPEC", DEFAULT_SPEC),
        help="spec used when a request names none (MAAS_VISION_DEFAULT_SPEC)",
    )
    add_limit_arguments(parser, "MAAS_VISION", VisionLimits(), LIMIT_HELP)
    args = parser.parse_args(argv)
    # One response is one gRPC message, so the server's message limit bounds it.
    limits_config = limits_from_args(VisionLimits, args, LIMIT_HELP, max_response_bytes=args.max_message_bytes)
    return VisionConfig(
        server=server_settings("vision", args),
        model_repository=args.model_repository,
        spec_dir=args.spec_dir,
        default_spec=args.default_spec,
        limits=limits_config,
    )
