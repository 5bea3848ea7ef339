"""create_server(cfg): the router's gRPC server, its long-lived peer channels and background tasks.

Call it inside a running event loop (services.shared.server.run does): it starts the registry watch.
Health is SERVING once started; until the first routing snapshot arrives requests get UNAVAILABLE
("routing state not received from the registry yet") and OIP ServerReady answers false.
"""
from __future__ import annotations

from maas.v1 import router_pb2, router_pb2_grpc
from services.router.config import RouterConfig
from services.router.dataplane import Dataplane
from services.router.peers import TokenizerPeer, TritonPeer, VisionPeer
from services.router.routing import RoutingTable
from services.router.servicer import InferenceServicer, RouterServicer, add_inference_service
from services.router.shadow import ShadowRunner
from services.router.watcher import RegistryWatcher
from services.shared.channels import open_channel
from services.shared.server import ServiceServer, build_server


def create_server(cfg: RouterConfig) -> tuple[ServiceServer, int]:
    limit = cfg.server.max_message_bytes
    channels = {name: open_channel(getattr(cfg, name), limit) for name in ("registry", "tokenizer", "vision", "triton")}
    table = RoutingTable()
    watcher = RegistryWatcher(channels["registry"], table)
    shadow = ShadowRunner(channels["registry"], max_inflight=cfg.shadow_max_inflight, timeout=cfg.shadow_timeout,
                          report_interval=cfg.shadow_report_interval, admin_token=cfg.admin_token)
    triton = TritonPeer(channels["triton"], cfg.triton)
    plane = Dataplane(table, triton, TokenizerPeer(channels["tokenizer"], cfg.tokenizer),
                      VisionPeer(channels["vision"], cfg.vision), shadow,
                      default_timeout=cfg.default_timeout, max_batch_items=cfg.max_batch_items)

    def register(server):
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(plane), server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
                add_inference_service(InferenceServicer(plane, table, triton), server)]

    service, port = build_server(cfg.server, register)
    watcher.start()
    # After the gRPC server drained: stop following the registry, report the last shadow results, close.
    service.on_stop.extend([watcher.stop, shadow.stop, *(channel.close for channel in channels.values())])
    return service, port
