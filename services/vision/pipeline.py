"""Encoded image → normalised float32 tensor slot, per a VisionSpec.

Same result as the torchvision-style reference (full decode, resize the shorter side with PIL's
antialiased filter, centre crop, (x/255 - mean)/std), computed with less work:
  * the pixel count is checked from the header, before anything is decoded (decompression bombs);
  * JPEGs that are much larger than needed are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (libjpeg-turbo via Pillow's draft), keeping at least `reducing_gap`× the resized size;
  * resize and centre crop are one PIL resize of the crop's source box, so only kept pixels are
    computed, with the same filter geometry as resize-then-crop;
  * normalisation is two in-place numpy passes straight into the caller's preallocated batch slot.
Pillow releases the GIL while decoding and resizing, so items can run on several threads.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.shared.config import DEFAULT_MAX_MESSAGE_BYTES
from services.shared.errors import InvalidArgument, ServiceError, item_error, limit_error
from services.vision.spec import VisionSpec

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class VisionLimits:
    """Refused before decoding; each limit is a flag and a MAAS_* variable."""

    max_batch: int = 64
    max_request_bytes: int = 48 * 1024 * 1024
    max_image_pixels: int = 40_000_000  # of the encoded image, as its header says
    # A thin image under the pixel limit still costs: the resize to the spec's shorter side blows the
    # longer one up (1x60000 -> 256x15M). Width, height and longer/shorter side, from the header too.
    max_image_width: int = 16384
    max_image_height: int = 16384
    max_aspect_ratio: int = 20
    # The response must fit in one gRPC message: batch x crop x 4 bytes (the server's --max-message-bytes).
    max_response_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def check_request(images: list[bytes], request_bytes: int, spec: VisionSpec, limits: VisionLimits) -> None:
    """Refuses a request over a batch or size limit before any image is opened."""
    if not images:
        raise InvalidArgument("images is empty: send at least one encoded image")
    if len(images) > limits.max_batch:
        raise limit_error("batch size", limits.max_batch, len(images))
    if request_bytes > limits.max_request_bytes:
        raise limit_error("request bytes", limits.max_request_bytes, request_bytes)
    response_bytes = len(images) * 4 * math.prod(spec.item_shape())
    if response_bytes > limits.max_response_bytes:
        raise limit_error("response bytes", limits.max_response_bytes, response_bytes)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # after EXIF orientation
    height: int
    draft_decoded: bool


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shorter`, the longer one is truncated."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def crop_origin(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int]:
    """torchvision's center_crop offsets (left, top)."""
    return int(round((width - crop_width) / 2.0)), int(round((height - crop_height) / 2.0))


class Preprocessor:
    """Turns one encoded image into one normalised slot of a batch array, per `spec`."""

    def __init__(
        self, spec: VisionSpec, max_image_pixels: int, reducing_gap: float = 2.0, limits: VisionLimits | None = None
    ):
        self.spec = spec
        self.max_image_pixels = max_image_pixels
        self.limits = limits or VisionLimits(max_image_pixels=max_image_pixels)
        self.reducing_gap = reducing_gap
        self.resample = _RESAMPLE[spec.interpolation]
        # (x/255 - mean)/std = x*scale + offset. mean/std are listed in output channel order; output
        # channel k reads source (RGB) channel order[k].
        std = np.asarray(spec.std, dtype=np.float64)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32)
        self.order = (0, 1, 2) if spec.channel_order == "RGB" else (2, 1, 0)

    def new_batch(self, size: int) -> np.ndarray:
        return np.empty((size, *self.spec.item_shape()), dtype=np.float32)

    def into(self, data: bytes, slot: np.ndarray, index: int) -> ImageInfo:
        """Decode `data` and write it into `slot` (one item of new_batch()); errors name `index`."""
        try:
            return self._into(data, slot, index)
        except ServiceError:
            raise
        except Image.DecompressionBombError as exc:
            # Pillow's own header check (at twice Image.MAX_IMAGE_PIXELS) fired before ours could.
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise limit_error(
                "image pixels", self.max_image_pixels, int(pixels[1]) if pixels else "too large", index
            ) from None
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is the caller's input
            raise item_error(InvalidArgument, index, f"corrupt or truncated image: {exc}") from None

    def _into(self, data: bytes, slot: np.ndarray, index: int) -> ImageInfo:
        if not data:
            raise item_error(InvalidArgument, index, "empty image bytes")
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise item_error(
                InvalidArgument, index, f"not an image in a supported format ({', '.join(FORMATS)})"
            ) from None
        source_format = image.format or "unknown"
        width, height = image.size
        if width * height > self.max_image_pixels:
            raise limit_error("image pixels", self.max_image_pixels, width * height, index)
        self._check_sides(width, height, index)
        draft_scale = self._draft(image)  # before load(): it changes how the JPEG is decoded
        image.load()
        orientation = _orientation(image)
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
        image = _to_rgb(image, self.spec.background)
        self._resize_crop_normalise(image, width, height, draft_scale, slot)
        return ImageInfo(source_format, width, height, draft_scale > 1)

    def _check_sides(self, width: int, height: int, index: int) -> None:
        """Header sizes against the side and aspect-ratio caps, before load() decodes anything."""
        limits = self.limits
        if width > limits.max_image_width:
            raise limit_error("image width", limits.max_image_width, width, index)
        if height > limits.max_image_height:
            raise limit_error("image height", limits.max_image_height, height, index)
        if width <= 0 or height <= 0:
            raise item_error(InvalidArgument, index, f"image of {width}x{height} pixels has no pixels")
        ratio = max(width, height) / min(width, height)
        if ratio > limits.max_aspect_ratio:
            raise limit_error("image aspect ratio", limits.max_aspect_ratio, f"{ratio:g} ({width}x{height})", index)

    def _draft(self, image: Image.Image) -> int:
        """DCT-domain downscale of a JPEG that is much larger than the resize target; returns the factor."""
        if image.format != "JPEG":
            return 1
        width, height = image.size
        factor = self.spec.resize_shorter * self.reducing_gap / min(width, height)
        if factor > 0.5:  # libjpeg scales by 1/2, 1/4 or 1/8 only
            return 1
        requested = (math.ceil(width * factor), math.ceil(height * factor))
        result = image.draft(image.mode, requested)
        return round(width / result[1][2]) if result else 1

    def _resize_crop_normalise(
        self, image: Image.Image, width: int, height: int, draft_scale: int, slot: np.ndarray
    ) -> None:
        spec = self.spec
        resized_w, resized_h = resized_size(width, height, spec.resize_shorter)
        left, top = crop_origin(resized_w, resized_h, spec.crop_width, spec.crop_height)
        # The crop's box in the decoded image: full-size coordinates scaled by resize and draft factors.
        sx = width / draft_scale / resized_w
        sy = height / draft_scale / resized_h
        box = (
            left * sx,
            top * sy,  # float rounding must not push the box past the image edge
            min((left + spec.crop_width) * sx, image.width),
            min((top + spec.crop_height) * sy, image.height),
        )
        cropped = image.resize(
            (spec.crop_width, spec.crop_height), self.resample, box=box, reducing_gap=self.reducing_gap
        )
        pixels = np.asarray(cropped)  # H, W, 3 uint8
        for k, c in enumerate(self.order):
            channel = slot[k] if spec.layout == "NCHW" else slot[..., k]
            np.multiply(pixels[..., c], self.scale[k], out=channel)
            channel += self.offset[k]


def _orientation(image: Image.Image) -> int:
    """EXIF orientation of a loaded image (1 = as stored). A malformed EXIF block is ignored rather
    than failing an otherwise good image."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - EXIF parsers raise many kinds of errors on bad metadata
        return 1
    return orientation if orientation in range(1, 9) else 1


def _to_rgb(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Any Pillow mode → 8-bit RGB: 16-bit greys scaled (not clipped), alpha composited on background."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode.startswith("I;16") or (mode == "I" and image.getextrema()[1] > 255):
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif mode == "1" or mode == "I" or mode == "F":
        image = image.convert("L")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        composite = Image.new("RGB", rgba.size, background)
        composite.paste(rgba, mask=rgba.getchannel("A"))
        return composite
    return image.convert("RGB") if image.mode != "RGB" else image
