"""The mesh's default ports: one place for the services' listen defaults, the peers' default addresses,
`maas up`, the local runtime, the clients and the chart test (the chart's values.yaml says the same).

Only the standard library here: the client and the CLI import it without the service code.
"""

from __future__ import annotations

ROUTER = 50051
REGISTRY = 50052
TOKENIZER = 50053
VISION = 50054
ROUTER_OIP_FAST = 50055  # the router's OIP fast path (compiled; --oip-fast-listen)
OPENAI = 8090  # the OpenAI-compatible HTTP gateway
CONSOLE = 8091  # the web console (HTTP)
TRITON_HTTP = 8000
TRITON_GRPC = 8001
TRITON_METRICS = 8002


def loopback(port: int) -> str:
    """The default address of a service on this machine."""
    return f"127.0.0.1:{port}"
