"""What the Preprocess and ListSpecs RPCs do, free of protobuf: checks limits, then decodes the batch
on the worker pool, each image written straight into its slot of one preallocated array."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from services.shared.errors import ServiceError
from services.shared.telemetry import BATCH_ITEMS, ITEM_ERRORS, PREPROCESS_SECONDS, annotate
from services.shared.workers import WorkerPool
from services.vision.pipeline import ImageInfo, Preprocessor, VisionLimits, check_request
from services.vision.spec import SpecCatalog, VisionSpec

SERVICE = "vision"


@dataclass
class PreprocessedBatch:
    spec: str
    tensor_name: str
    tensor: np.ndarray  # FP32 [batch, 3, H, W] or [batch, H, W, 3]
    images: list[ImageInfo]


class VisionDataplane:
    def __init__(self, catalog: SpecCatalog, limits: VisionLimits, pool: WorkerPool):
        self.catalog = catalog
        self.limits = limits
        self.pool = pool
        self._preprocessors = {
            name: Preprocessor(spec, limits.max_image_pixels, limits=limits) for name, spec in catalog.items.items()
        }

    def specs(self) -> list[VisionSpec]:
        return list(self.catalog.items.values())

    async def preprocess(
        self, spec_name: str, images: list[bytes], output_name: str, request_bytes: int
    ) -> PreprocessedBatch:
        spec = self.catalog.get(spec_name)
        annotate(model=spec.name, batch_size=len(images), items=len(images), bytes=request_bytes)
        BATCH_ITEMS.labels(SERVICE, "Preprocess").observe(len(images))
        preprocessor = self._preprocessors[spec.name]
        start = time.perf_counter()
        try:
            check_request(images, request_bytes, spec, self.limits)
            batch = preprocessor.new_batch(len(images))

            def run(first: int, stop: int) -> list[ImageInfo]:
                return [preprocessor.into(images[i], batch[i], i) for i in range(first, stop)]

            # One image per chunk: concurrent requests interleave image by image on the workers.
            infos = [info for chunk in await self.pool.map_chunks(run, len(images), 1) for info in chunk]
        except ServiceError as exc:
            ITEM_ERRORS.labels(SERVICE, type(exc).__name__).inc()
            raise
        elapsed = time.perf_counter() - start
        PREPROCESS_SECONDS.labels(SERVICE, "image").observe(elapsed)
        annotate(preprocess_ms=elapsed * 1000, output_shape=list(batch.shape))
        return PreprocessedBatch(spec.name, output_name or spec.input_name, batch, infos)
