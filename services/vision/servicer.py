"""Vision gRPC servicer: protobuf ⇄ domain types only; the work is in dataplane.py."""

from __future__ import annotations

import grpc

from maas.v1 import vision_pb2, vision_pb2_grpc
from services.shared.tensors import to_proto
from services.vision.dataplane import VisionDataplane


class VisionServicer(vision_pb2_grpc.VisionServicer):
    def __init__(self, dataplane: VisionDataplane):
        self.dataplane = dataplane

    async def Preprocess(self, request: vision_pb2.PreprocessRequest, context: grpc.aio.ServicerContext):
        batch = await self.dataplane.preprocess(
            request.spec, list(request.images), request.output_name, request.ByteSize()
        )
        return vision_pb2.PreprocessResponse(
            tensor=to_proto(batch.tensor_name, batch.tensor),
            images=[
                vision_pb2.ImageInfo(format=i.format, width=i.width, height=i.height, draft_decoded=i.draft_decoded)
                for i in batch.images
            ],
            spec=batch.spec,
        )

    async def ListSpecs(self, request, context):
        return vision_pb2.ListSpecsResponse(
            specs=[
                vision_pb2.VisionSpec(
                    name=s.name,
                    resize_shorter=s.resize_shorter,
                    crop_height=s.crop_height,
                    crop_width=s.crop_width,
                    mean=s.mean,
                    std=s.std,
                    channel_order=s.channel_order,
                    layout=s.layout,
                    interpolation=s.interpolation,
                    input_name=s.input_name,
                )
                for s in self.dataplane.specs()
            ],
            default_spec=self.dataplane.catalog.default,
        )
