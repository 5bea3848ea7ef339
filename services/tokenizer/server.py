"""Builds the tokenizer gRPC server: load tokenizers, start a worker pool, register the servicer."""

from __future__ import annotations

import os

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.server import ServiceServer, build_server
from services.shared.workers import WorkerPool
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.dataplane import TokenizerDataplane
from services.tokenizer.servicer import TokenizerServicer


def create_server(cfg: TokenizerConfig) -> tuple[ServiceServer, int]:
    # tokenizers' thread pool is sized once, at first use: as many threads as --workers, unless set.
    os.environ.setdefault("RAYON_NUM_THREADS", str(cfg.server.workers))
    catalog = TokenizerCatalog.discover(
        cfg.model_repository, cfg.tokenizer_dir, cfg.default_tokenizer, cfg.limits.max_tokens
    )
    pool = WorkerPool(cfg.server.workers, "tokenizer")
    dataplane = TokenizerDataplane(catalog, cfg.limits, pool)

    def register(server):
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(dataplane), server)
        return [tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name]

    server, port = build_server(cfg.server, register)
    server.on_stop.append(pool.shutdown)
    return server, port
