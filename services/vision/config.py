"""Vision service settings: flags, then MAAS_* environment, then loopback defaults."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from services.shared.config import (
    ConfigError, ServerSettings, add_server_arguments, env, env_int, server_settings,
)
from services.shared.model_repository import add_model_repository_argument
from services.vision.pipeline import VisionLimits

DEFAULT_LISTEN = "127.0.0.1:50054"
DEFAULT_SPEC = "efficientnet_lite0"


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
    parser.add_argument("--spec-dir", type=Path, default=env("MAAS_VISION_SPEC_DIR"),
                        help="extra directory of <name>/preprocess.json (MAAS_VISION_SPEC_DIR)")
    parser.add_argument("--default-spec", default=env("MAAS_VISION_DEFAULT_SPEC", DEFAULT_SPEC),
                        help="spec used when a request names none (MAAS_VISION_DEFAULT_SPEC)")
    defaults = VisionLimits()
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=env_int("MAAS_VISION_MAX_BATCH", defaults.max_batch),
                        help="images per request (MAAS_VISION_MAX_BATCH)")
    limits.add_argument("--max-request-bytes", type=int,
                        default=env_int("MAAS_VISION_MAX_REQUEST_BYTES", defaults.max_request_bytes),
                        help="encoded request size (MAAS_VISION_MAX_REQUEST_BYTES)")
    limits.add_argument("--max-image-pixels", type=int,
                        default=env_int("MAAS_VISION_MAX_IMAGE_PIXELS", defaults.max_image_pixels),
                        help="width x height of one image, checked before decoding (MAAS_VISION_MAX_IMAGE_PIXELS)")
    args = parser.parse_args(argv)
    limits_config = VisionLimits(max_batch=args.max_batch, max_request_bytes=args.max_request_bytes,
                                 max_image_pixels=args.max_image_pixels, max_response_bytes=args.max_message_bytes)
    for field in dataclasses.fields(limits_config):
        if getattr(limits_config, field.name) <= 0:
            raise ConfigError(f"--{field.name.replace('_', '-')} must be positive")
    return VisionConfig(
        server=server_settings("vision", args),
        model_repository=args.model_repository,
        spec_dir=args.spec_dir,
        default_spec=args.default_spec,
        limits=limits_config,
    )
