"""Tracing is configured only by OTEL_* variables and exports over both OTLP gRPC and OTLP/HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_EMIT_ONE_SPAN = """
from opentelemetry import trace
from services.shared.telemetry import setup_tracing, shutdown_tracing
print("configured" if setup_tracing("maas-probe") else "off")
with trace.get_tracer("probe").start_as_current_span("probe-span") as span:
    span.set_attribute("probe.protocol", "{protocol}")
shutdown_tracing()
"""


def _run(env_overrides: dict[str, str], protocol: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", _EMIT_ONE_SPAN.format(protocol=protocol)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_over_each_protocol(otlp_receiver, protocol):
    endpoint = otlp_receiver.grpc_endpoint if protocol == "grpc" else otlp_receiver.http_endpoint
    out = _run({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}, protocol)
    assert out == "configured"
    spans = otlp_receiver.wait_for(
        lambda spans: any(s.attributes.get("probe.protocol") == protocol for s in spans), timeout=10
    )
    span = next(s for s in spans if s.attributes.get("probe.protocol") == protocol)
    assert span.service == "maas-probe"
    assert span.name == "probe-span"


def test_service_name_from_environment_wins(otlp_receiver):
    _run(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "custom-name",
        },
        "named",
    )
    spans = otlp_receiver.wait_for(lambda spans: any(s.attributes.get("probe.protocol") == "named" for s in spans))
    assert next(s for s in spans if s.attributes.get("probe.protocol") == "named").service == "custom-name"


def test_no_otel_settings_means_no_tracing():
    assert _run({}, "none") == "off"
