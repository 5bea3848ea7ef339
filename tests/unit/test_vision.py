"""Vision domain: matches the torchvision-style reference, honours EXIF and every colour mode, refuses
bad input by item, and parses specs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from services.shared.config import ConfigError
from services.shared.errors import InvalidArgument, NotFound, ResourceExhausted
from services.vision.pipeline import (
    Preprocessor,
    VisionLimits,
    check_request,
    crop_origin,
    resized_size,
)
from services.vision.spec import SpecCatalog, VisionSpec
from tests.fixtures.preprocessing import encode, photo, reference_preprocess

SPEC = VisionSpec(
    name="test",
    resize_shorter=256,
    crop_height=224,
    crop_width=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    input_name="x",
)
ONE_LEVEL = 1 / 255 / min(SPEC.std) + 1e-6  # one 8-bit step, normalised


def run(data: bytes, spec: VisionSpec = SPEC, max_pixels: int = 40_000_000):
    pre = Preprocessor(spec, max_pixels)
    batch = pre.new_batch(1)
    info = pre.into(data, batch[0], 0)
    return batch[0], info


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(photo("chelsea"))


def test_torchvision_geometry():
    assert resized_size(640, 480, 256) == (341, 256)
    assert resized_size(480, 640, 256) == (256, 341)
    assert resized_size(451, 300, 256) == (384, 256)
    assert crop_origin(341, 256, 224, 224) == (58, 16)  # round(58.5) is 58, as in torchvision


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "rocket"])
def test_matches_reference_when_no_draft(name):
    data = encode(photo(name), "JPEG", quality=92)
    out, info = run(data)
    ref = reference_preprocess(data, SPEC)
    assert out.shape == ref.shape == (3, 224, 224)
    assert not info.draft_decoded
    # Same filter and geometry; resizing only the crop box may round a rare pixel the other way.
    assert np.abs(out - ref).max() <= ONE_LEVEL
    assert np.abs(out - ref).mean() < 1e-3


@pytest.mark.parametrize("size", [(1920, 1080), (4032, 3024)])
def test_draft_decoding_stays_close_to_reference(chelsea, size):
    data = encode(chelsea.resize(size, Image.Resampling.LANCZOS), "JPEG", quality=90)
    out, info = run(data)
    ref = reference_preprocess(data, SPEC)
    assert info.draft_decoded and (info.width, info.height) == size
    mad = float(np.abs(out - ref).mean())
    print(f"vision draft path {size[0]}x{size[1]}: mean abs diff vs reference {mad:.5f} (normalised units)")
    assert mad < 0.01


def test_nhwc_bgr_layout_is_a_permutation_of_nchw_rgb(chelsea):
    data = encode(chelsea, "PNG")
    nchw, _ = run(data)
    bgr_spec = VisionSpec(
        **{**SPEC.__dict__, "layout": "NHWC", "channel_order": "BGR", "mean": SPEC.mean[::-1], "std": SPEC.std[::-1]}
    )
    nhwc, _ = run(data, bgr_spec)
    assert nhwc.shape == (224, 224, 3)
    # BGR with reversed mean/std must be exactly the RGB result with channels reversed.
    np.testing.assert_allclose(nhwc, nchw.transpose(1, 2, 0)[..., ::-1], atol=1e-6)


@pytest.mark.parametrize(
    "orientation,transpose",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),  # stored rotated 90° CCW; viewer turns it 270° back
        (8, Image.Transpose.ROTATE_270),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
        (5, Image.Transpose.TRANSPOSE),
    ],
)
@pytest.mark.parametrize("size", [None, (1600, 1200)])
def test_exif_orientation_is_applied(chelsea, orientation, transpose, size):
    upright = chelsea if size is None else chelsea.resize(size)
    stored = upright.transpose(transpose)
    if orientation in (6, 8):  # these tags undo the opposite rotation
        stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    out, info = run(data)
    expected, _ = run(encode(upright, "JPEG", quality=95))
    assert (info.width, info.height) == upright.size
    assert np.abs(out - expected).mean() < 0.03  # equal up to JPEG re-encoding of rotated blocks
    assert np.abs(out - run(encode(stored, "JPEG", quality=95))[0]).mean() > 0.1  # orientation mattered


def test_grayscale_images_become_three_equal_channels(chelsea):
    gray = chelsea.convert("L")
    spec = VisionSpec(**{**SPEC.__dict__, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    for data in (encode(gray, "JPEG", quality=95), encode(gray, "PNG"), encode(gray.convert("1"), "PNG")):
        out, _ = run(data, spec)
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    out, _ = run(encode(gray, "PNG"), spec)
    ref = reference_preprocess(encode(gray.convert("RGB"), "PNG"), spec)
    assert np.abs(out - ref).max() <= 1 / 255 / 0.5 + 1e-6


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (300, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    spec = VisionSpec(**{**SPEC.__dict__, "mean": (0.0,) * 3, "std": (1.0,) * 3})
    out, _ = run(data, spec)
    assert out[0, :, 0].mean() < 0.1 and out[0, :, -1].mean() > 0.9  # dark to bright, not all white
    assert np.all(np.diff(out[0, 100]) >= 0)


def test_cmyk_and_palette_images_decode_to_the_right_colours(chelsea):
    rgb, _ = run(encode(chelsea, "PNG"))
    cmyk, _ = run(encode(chelsea.convert("CMYK"), "JPEG", quality=95))
    palette, _ = run(encode(chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"))
    assert np.abs(cmyk - rgb).mean() < 0.05
    assert np.abs(palette - rgb).mean() < 0.1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_onto_the_background(mode):
    image = Image.new("RGBA", (300, 300), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 300, 150))  # top half: transparent black
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = image.getpixel((0, 0))
    spec = VisionSpec(**{**SPEC.__dict__, "mean": (0.0,) * 3, "std": (1.0,) * 3, "background": (255, 255, 255)})
    out, _ = run(encode(image, "PNG", **({"transparency": image.info["transparency"]} if mode == "P" else {})), spec)
    np.testing.assert_allclose(out[:, 10, 100], [1.0, 1.0, 1.0])  # white, not the hidden black
    assert out[:, 200, 100].tolist() != [1.0, 1.0, 1.0]  # opaque part keeps its colour


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_other_formats(chelsea, fmt):
    out, info = run(encode(chelsea, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert info.format == fmt and not info.draft_decoded
    if fmt != "GIF":  # lossless formats equal the reference on the same pixels
        assert np.abs(out - reference_preprocess(encode(chelsea, "PNG"), SPEC)).mean() < 1e-3


def test_bad_images_are_refused_naming_the_item(chelsea):
    good = encode(chelsea, "JPEG")
    png = bytearray(encode(chelsea, "PNG"))
    png[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # damaged compressed pixels
    corrupt_png = bytes(png)
    pre = Preprocessor(SPEC, 1_000_000)
    batch = pre.new_batch(1)
    cases = {
        b"": (InvalidArgument, "item 3: empty image bytes"),
        b"definitely not an image": (InvalidArgument, "item 3: not an image in a supported format"),
        good[: len(good) // 2]: (InvalidArgument, "item 3: corrupt or truncated image"),
        good[:200]: (InvalidArgument, "item 3: corrupt or truncated image"),
        corrupt_png: (InvalidArgument, "item 3: corrupt or truncated image"),
        encode(Image.new("L", (2000, 1000)), "PNG"): (
            ResourceExhausted,
            "item 3: image pixels is 2000000, over the limit of 1000000",
        ),
        encode(Image.new("RGB", (50, 50)), "PPM"): (InvalidArgument, "item 3: not an image in a supported format"),
    }
    for data, (kind, message) in cases.items():
        with pytest.raises(kind, match=message):
            pre.into(data, batch[0], 3)
    pre.into(good, batch[0], 0)  # still works after failures


@pytest.mark.parametrize("size", [(10000, 5000), (20000, 20000)])  # under / over Pillow's own bomb check
def test_pixel_limit_is_checked_before_decoding(monkeypatch, size):
    """A 1-bit PNG of zeros is small on the wire but huge decoded: refused from its header, never loaded."""
    bomb = encode(Image.new("1", size), "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    pixels = size[0] * size[1]
    with pytest.raises(ResourceExhausted, match=rf"item 0: image pixels is {pixels}, over the limit of 40000000"):
        run(bomb)


def test_request_limits():
    limits = VisionLimits(max_batch=2, max_request_bytes=100, max_image_pixels=10, max_response_bytes=1_000_000)
    with pytest.raises(ResourceExhausted, match="batch size is 3, over the limit of 2"):
        check_request([b"x"] * 3, 3, SPEC, limits)
    with pytest.raises(ResourceExhausted, match="request bytes is 101, over the limit of 100"):
        check_request([b"x"], 101, SPEC, limits)
    with pytest.raises(ResourceExhausted, match="response bytes is 1204224, over the limit of 1000000"):
        check_request([b"x"] * 2, 2, SPEC, limits)  # 2 x 3x224x224 floats
    with pytest.raises(InvalidArgument, match="images is empty"):
        check_request([], 0, SPEC, limits)
    check_request([b"x"], 1, SPEC, limits)


def test_malformed_exif_is_ignored(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 42  # not an orientation
    out, info = run(encode(chelsea, "JPEG", quality=95, exif=exif.tobytes()))
    assert (info.width, info.height) == chelsea.size


def test_spec_catalog_reads_preprocess_json_and_config(vision_repository, tmp_path):
    catalog = SpecCatalog.discover(vision_repository, None, "efficientnet_lite0")
    spec = catalog.get("")
    assert spec.name == "efficientnet_lite0" and spec.input_name == "INPUT__0"  # from config.pbtxt
    assert (spec.resize_shorter, spec.crop_height, spec.crop_width) == (256, 224, 224)
    (tmp_path / "square").mkdir()
    (tmp_path / "square" / "preprocess.json").write_text(
        json.dumps(
            {
                "resize_shorter": 160,
                "crop": 128,
                "mean": [0, 0, 0],
                "std": [1, 1, 1],
                "layout": "nhwc",
                "channel_order": "bgr",
                "input_name": "pixels",
            }
        )
    )
    catalog = SpecCatalog.discover(vision_repository, tmp_path, "efficientnet_lite0")
    square = catalog.get("square")
    assert (square.crop_height, square.crop_width, square.layout, square.channel_order, square.input_name) == (
        128,
        128,
        "NHWC",
        "BGR",
        "pixels",
    )
    with pytest.raises(NotFound, match="'nope' not found; known: efficientnet_lite0, square"):
        catalog.get("nope")


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1]}, "missing key 'resize_shorter'"),
        ({"resize_shorter": 100, "crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1]}, "larger than resize_shorter"),
        ({"resize_shorter": 256, "crop": 224, "mean": [0, 0], "std": [1, 1, 1]}, "3 values"),
        ({"resize_shorter": 256, "crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1], "layout": "CHW"}, "layout"),
        ({"resize_shorter": 256, "crop": 224, "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "cubic"}, "interp"),
    ],
)
def test_invalid_specs_fail_at_start(tmp_path, bad, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "preprocess.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=message):
        SpecCatalog.discover(tmp_path, None, "m")


def test_missing_default_spec_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="default vision spec 'efficientnet_lite0' not found"):
        SpecCatalog.discover(tmp_path, None, "efficientnet_lite0")


def test_config_flags_env_and_defaults(monkeypatch):
    from services.vision.config import load_config

    for name in ("MAAS_LISTEN", "MAAS_VISION_MAX_IMAGE_PIXELS", "MAAS_VISION_SPEC_DIR", "MAAS_MAX_MESSAGE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    config = load_config([])
    assert config.server.listen == "127.0.0.1:50054" and config.default_spec == "efficientnet_lite0"
    assert config.limits == VisionLimits() and config.spec_dir is None
    monkeypatch.setenv("MAAS_VISION_MAX_IMAGE_PIXELS", "1000")
    config = load_config(["--max-batch", "3", "--spec-dir", "/srv/specs", "--max-message-bytes", "1048576"])
    assert (config.limits.max_batch, config.limits.max_image_pixels, config.limits.max_response_bytes) == (
        3,
        1000,
        1048576,
    )
    assert str(config.spec_dir) == "/srv/specs"
    with pytest.raises(ConfigError, match="--max-request-bytes must be positive"):
        load_config(["--max-request-bytes", "-1"])
