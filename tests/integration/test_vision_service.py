"""The vision service over real gRPC: tensors the real Triton efficientnet_lite0 classifies like the
reference pipeline's, bad input refused per item, and concurrency."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
from PIL import Image

from maas.v1 import vision_pb2, vision_pb2_grpc
from services.shared.channels import open_channel
from services.shared.tensors import from_proto
from services.vision.pipeline import VisionLimits
from services.vision.server import create_server
from services.vision.spec import SpecCatalog
from tests.fixtures.preprocessing import encode, photo, reference_preprocess, serving

TABBY_TIGER_EGYPTIAN_CATS = range(281, 286)
ESPRESSO_CUP = (967, 968)


@pytest.fixture
async def stub(vision_service):
    async with open_channel(vision_service.address) as channel:
        yield vision_pb2_grpc.VisionStub(channel)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """The test photos at their shipped size and as larger camera-like JPEGs (draft-decoded)."""
    chelsea, coffee = Image.fromarray(photo("chelsea")), Image.fromarray(photo("coffee"))
    return {
        "chelsea": encode(chelsea, "JPEG", quality=92),
        "coffee": encode(coffee, "JPEG", quality=92),
        "chelsea_1920": encode(chelsea.resize((1920, 1276), Image.Resampling.LANCZOS), "JPEG", quality=90),
        "coffee_2400": encode(coffee.resize((2400, 1600), Image.Resampling.LANCZOS), "JPEG", quality=90),
    }


def classify(triton, batch: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(triton.grpc_address)
    try:
        infer_input = triton_grpc.InferInput("INPUT__0", list(batch.shape), "FP32")
        infer_input.set_data_from_numpy(batch)
        return client.infer("efficientnet_lite0", [infer_input]).as_numpy("OUTPUT__0")
    finally:
        client.close()


async def test_top1_unchanged_versus_reference_on_triton(stub, triton, photos, vision_repository):
    names = list(photos)
    response = await stub.Preprocess(vision_pb2.PreprocessRequest(images=[photos[n] for n in names]))
    tensor = response.tensor
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("INPUT__0", "FP32", [4, 3, 224, 224])
    fast = from_proto(tensor)
    spec = SpecCatalog.discover(vision_repository, None, "efficientnet_lite0").get("")
    reference = np.stack([reference_preprocess(photos[n], spec) for n in names])
    for name, item, info in zip(names, np.abs(fast - reference).mean(axis=(1, 2, 3)), response.images):
        print(f"vision vs reference {name}: mean abs diff {item:.5f} (draft {info.draft_decoded})")
    assert [i.draft_decoded for i in response.images] == [False, False, True, True]
    assert np.abs(fast - reference).mean() < 0.01

    fast_top1 = classify(triton, np.ascontiguousarray(fast)).argmax(axis=1)
    reference_top1 = classify(triton, reference).argmax(axis=1)
    assert fast_top1.tolist() == reference_top1.tolist()
    assert fast_top1[0] in TABBY_TIGER_EGYPTIAN_CATS and fast_top1[2] in TABBY_TIGER_EGYPTIAN_CATS
    assert fast_top1[1] in ESPRESSO_CUP and fast_top1[3] in ESPRESSO_CUP


async def test_image_info_and_output_name(stub, photos):
    response = await stub.Preprocess(
        vision_pb2.PreprocessRequest(images=[photos["coffee"], encode(photo("chelsea"), "PNG")], output_name="pixels")
    )
    assert response.tensor.name == "pixels" and response.spec == "efficientnet_lite0"
    assert [(i.format, i.width, i.height) for i in response.images] == [("JPEG", 600, 400), ("PNG", 451, 300)]
    listing = await stub.ListSpecs(vision_pb2.ListSpecsRequest())
    assert listing.default_spec == "efficientnet_lite0"
    (spec,) = listing.specs
    assert (spec.resize_shorter, spec.crop_height, spec.crop_width, spec.layout, spec.input_name) == (
        256,
        224,
        224,
        "NCHW",
        "INPUT__0",
    )


@pytest.fixture
async def strict_stub(vision_config):
    limits = VisionLimits(max_batch=4, max_request_bytes=2_000_000, max_image_pixels=4_000_000)
    config = dataclasses.replace(vision_config, limits=limits)
    async with serving(create_server, config) as running, open_channel(running.address) as channel:
        yield vision_pb2_grpc.VisionStub(channel)


async def test_bad_images_get_statuses_naming_the_item(strict_stub, photos):
    good = photos["chelsea"]
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")  # ~100 KB on the wire, 900 MP decoded
    png = bytearray(encode(photo("coffee"), "PNG"))
    png[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zeroed compressed pixels: a CRC/zlib error
    corrupt_png = bytes(png)
    cases = [
        ([good, good, good[: len(good) // 3]], grpc.StatusCode.INVALID_ARGUMENT, "item 2: corrupt or truncated image"),
        ([good, corrupt_png], grpc.StatusCode.INVALID_ARGUMENT, "item 1: corrupt or truncated image"),
        ([good, b"GIF89a nonsense"], grpc.StatusCode.INVALID_ARGUMENT, "item 1: not an image in a supported format"),
        ([b"\x00" * 100], grpc.StatusCode.INVALID_ARGUMENT, "item 0: not an image in a supported format"),
        ([good, b""], grpc.StatusCode.INVALID_ARGUMENT, "item 1: empty image bytes"),
        (
            [good, bomb],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "item 1: image pixels is 900000000, over the limit of 4000000",
        ),
        ([good] * 5, grpc.StatusCode.RESOURCE_EXHAUSTED, "batch size is 5, over the limit of 4"),
        ([photos["coffee_2400"]] * 4, grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit of 2000000 (request bytes"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "images is empty"),
    ]
    for images, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await strict_stub.Preprocess(vision_pb2.PreprocessRequest(images=images))
        assert failure.value.code() == code, failure.value.details()
        assert message in failure.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await strict_stub.Preprocess(vision_pb2.PreprocessRequest(spec="resnet", images=[good]))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    ok = await strict_stub.Preprocess(vision_pb2.PreprocessRequest(images=[good]))  # still serving
    assert list(ok.tensor.shape) == [1, 3, 224, 224]


async def test_thin_or_wide_images_are_refused_from_the_header(stub, photos):
    """Under the pixel limit, yet costly to decode and resize (the shorter side is scaled up to 256):
    refused by the width / height / aspect-ratio caps before anything is decoded (default limits)."""
    cases = [
        (encode(Image.new("L", (1, 60000)), "PNG"), "item 0: image height is 60000, over the limit of 16384"),
        (encode(Image.new("L", (60000, 1)), "PNG"), "item 0: image width is 60000, over the limit of 16384"),
        (encode(Image.new("RGB", (60000, 8)), "JPEG"), "item 0: image width is 60000, over the limit of 16384"),
        (
            encode(Image.new("L", (10000, 2)), "PNG"),
            "item 0: image aspect ratio is 5000 (10000x2), over the limit of 20",
        ),
        # Bomb-like: 38 MP of one colour (a few KB on the wire), under the 40 MP limit, past the width cap.
        (encode(Image.new("1", (20000, 1900)), "PNG"), "item 0: image width is 20000, over the limit of 16384"),
    ]
    for image, message in cases:
        assert len(image) < 200_000
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Preprocess(vision_pb2.PreprocessRequest(images=[image]))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failure.value.details()
        assert message in failure.value.details()
    wide_but_allowed = encode(Image.fromarray(photo("coffee")).resize((1200, 100)), "PNG")  # 12:1, under the caps
    ok = await stub.Preprocess(vision_pb2.PreprocessRequest(images=[wide_but_allowed, photos["chelsea"]]))
    assert list(ok.tensor.shape) == [2, 3, 224, 224]


async def test_small_request_is_not_stuck_behind_a_big_one(stub, photos):
    """Concurrent requests take turns image by image: one image sent while a 32-image batch is being
    decoded is answered first."""
    finished = []

    async def call(name, images):
        await stub.Preprocess(vision_pb2.PreprocessRequest(images=images))
        finished.append(name)

    big = asyncio.create_task(call("big", [photos["chelsea_1920"]] * 32))
    await asyncio.sleep(0.05)
    await call("small", [photos["coffee"]])
    await big
    assert finished == ["small", "big"]


async def test_batch_over_workers_equals_one_by_one(stub, photos):
    images = [photos[n] for n in photos] * 3
    batch = from_proto((await stub.Preprocess(vision_pb2.PreprocessRequest(images=images))).tensor)
    for i, image in enumerate(images[:4]):
        alone = from_proto((await stub.Preprocess(vision_pb2.PreprocessRequest(images=[image]))).tensor)
        assert np.array_equal(batch[i], alone[0]) and np.array_equal(batch[i + 4], alone[0])
