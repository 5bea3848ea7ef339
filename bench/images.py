"""A fixed set of JPEGs of realistic sizes for the vision benchmarks, made from the photos that
scikit-image ships: each photo centre-cropped to the size's aspect ratio, resized with Lanczos and
saved at quality 90 (4:2:0), so every run decodes the same bytes."""

from __future__ import annotations

import io

from PIL import Image

# VGA webcam, HD video frame, Full HD screenshot, 12 MP phone camera.
SIZES = ((640, 480), (1280, 720), (1920, 1080), (4032, 3024))
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    width, height = image.size
    target = size[0] / size[1]
    if width / height > target:  # too wide: crop the sides
        crop_w = round(height * target)
        box = ((width - crop_w) // 2, 0, (width - crop_w) // 2 + crop_w, height)
    else:
        crop_h = round(width / target)
        box = (0, (height - crop_h) // 2, width, (height - crop_h) // 2 + crop_h)
    return image.resize(size, Image.Resampling.LANCZOS, box=box)


def jpeg_set(sizes=SIZES, photos=PHOTOS, quality: int = 90) -> dict[tuple[int, int], list[bytes]]:
    """{(width, height): [JPEG bytes, one per photo]}."""
    import skimage.data

    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in photos]
    result = {}
    for size in sizes:
        encoded = []
        for source in sources:
            buffer = io.BytesIO()
            _fit(source, size).save(buffer, format="JPEG", quality=quality)
            encoded.append(buffer.getvalue())
        result[size] = encoded
    return result
