"""Preprocessing specs: how a model wants its images, shipped beside it as preprocess.json.

    {"resize_shorter": 256, "crop": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "channel_order": "RGB", "layout": "NCHW", "interpolation": "bilinear",
     "input_name": "INPUT__0", "background": [255, 255, 255]}

"crop" is [height, width] or one number; "crop_height"/"crop_width" (VisionSpec's field names) work
too. mean and std are listed in channel_order (for a BGR model: blue first). input_name defaults to
the first input of the model's config.pbtxt; background is the colour transparent pixels are
composited onto (default white).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from services.shared.config import ConfigError
from services.shared.catalog import Catalog
from services.shared.model_repository import model_input_names, models_with

log = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class VisionSpec:
    name: str
    resize_shorter: int
    crop_height: int
    crop_width: int
    mean: tuple[float, ...]  # three: one per channel (checked below)
    std: tuple[float, ...]
    channel_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "bilinear"
    input_name: str = "input"
    background: tuple[int, ...] = (255, 255, 255)

    def __post_init__(self) -> None:
        problems = []
        if self.resize_shorter <= 0 or self.crop_height <= 0 or self.crop_width <= 0:
            problems.append("resize_shorter and crop must be positive")
        if max(self.crop_height, self.crop_width) > self.resize_shorter:
            problems.append(
                f"crop {self.crop_height}x{self.crop_width} is larger than resize_shorter {self.resize_shorter}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            problems.append("mean and std need 3 values each, std positive")
        if self.channel_order not in ("RGB", "BGR"):
            problems.append(f"channel_order {self.channel_order!r} is not RGB or BGR")
        if self.layout not in ("NCHW", "NHWC"):
            problems.append(f"layout {self.layout!r} is not NCHW or NHWC")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            problems.append("background needs 3 values in 0..255")
        if problems:
            raise ValueError("; ".join(problems))

    def item_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return 3, self.crop_height, self.crop_width
        return self.crop_height, self.crop_width, 3

    @classmethod
    def from_dict(cls, name: str, data: dict, default_input_name: str = "input") -> VisionSpec:
        crop = data.get("crop", [data.get("crop_height"), data.get("crop_width")])
        crop_height, crop_width = (crop, crop) if isinstance(crop, int) else crop
        try:
            return cls(
                name=name,
                resize_shorter=int(data["resize_shorter"]),
                crop_height=int(crop_height),
                crop_width=int(crop_width),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                channel_order=str(data.get("channel_order", "RGB")).upper(),
                layout=str(data.get("layout", "NCHW")).upper(),
                interpolation=str(data.get("interpolation", "bilinear")).lower(),
                input_name=str(data.get("input_name") or default_input_name),
                background=tuple(int(v) for v in data.get("background", (255, 255, 255))),
            )
        except KeyError as exc:
            raise ValueError(f"missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def load(cls, name: str, path: Path) -> VisionSpec:
        """Reads <model>/preprocess.json; the input name falls back to the model's first input."""
        inputs = model_input_names(path.parent)
        try:
            return cls.from_dict(name, json.loads(path.read_text()), inputs[0] if inputs else "input")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise ConfigError(f"vision spec {name!r} ({path}): {exc}") from None


class SpecCatalog(Catalog[VisionSpec]):
    """Specs by name, with the one used when a request names none."""

    def __init__(self, specs: dict[str, VisionSpec], default: str):
        super().__init__(
            specs, default, "vision spec", "<model>/preprocess.json under --model-repository or --spec-dir"
        )

    @classmethod
    def discover(cls, model_repository: Path, extra_dir: Path | None, default: str) -> SpecCatalog:
        specs = {}
        for name, path in models_with("preprocess.json", model_repository, extra_dir).items():
            specs[name] = VisionSpec.load(name, path)
            log.info("vision spec loaded", extra={"spec": name, "path": str(path)})
        return cls(specs, default)
