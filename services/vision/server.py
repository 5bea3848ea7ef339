"""Builds the vision gRPC server: load specs, start a worker pool, register the servicer."""

from __future__ import annotations

from maas.v1 import vision_pb2, vision_pb2_grpc
from services.shared.server import ServiceServer, build_server
from services.shared.workers import WorkerPool
from services.vision.config import VisionConfig
from services.vision.dataplane import VisionDataplane
from services.vision.servicer import VisionServicer
from services.vision.spec import SpecCatalog


def create_server(cfg: VisionConfig) -> tuple[ServiceServer, int]:
    catalog = SpecCatalog.discover(cfg.model_repository, cfg.spec_dir, cfg.default_spec)
    pool = WorkerPool(cfg.server.workers, "vision")
    dataplane = VisionDataplane(catalog, cfg.limits, pool)

    def register(server):
        vision_pb2_grpc.add_VisionServicer_to_server(VisionServicer(dataplane), server)
        return [vision_pb2.DESCRIPTOR.services_by_name["Vision"].full_name]

    server, port = build_server(cfg.server, register)
    server.on_stop.append(pool.shutdown)
    return server, port
