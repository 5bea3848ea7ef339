"""A wrong Triton address makes the router and the registry unready - not dead, not hung - with the
reason in their log, and they turn ready by themselves once Triton answers there (the chart's
readinessProbe asks health name "readiness", its liveness and startup probes ask "")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from maas.local.processes import free_ports
from maas.local.triton import LocalTriton, TritonConfig
from services.shared.server import READINESS

REPO = Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _flags(service: str, triton: str, tmp_path: Path) -> list[str]:
    if service == "router":  # its other peers are not needed for readiness (nothing listens on port 1)
        return [
            "--registry",
            "127.0.0.1:1",
            "--tokenizer",
            "127.0.0.1:1",
            "--vision",
            "127.0.0.1:1",
            "--triton",
            triton,
            "--oip-fast-listen",
            "off",
        ]
    (tmp_path / "registry-models").mkdir(exist_ok=True)
    return [
        "--database",
        str(tmp_path / "registry.sqlite3"),
        "--model-repository",
        str(tmp_path / "registry-models"),
        "--triton",
        triton,
    ]


@contextmanager
def service(name: str, triton: str, tmp_path: Path):
    """`python -m services.<name>` (JSON logs, readiness checked every 0.5 s) -> (address, log path); stopped after."""
    address = f"127.0.0.1:{free_ports(1)[0]}"
    log_path = tmp_path / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MAAS_LOG_FORMAT": "json", "MAAS_READINESS_INTERVAL_SECONDS": "0.5"}
    env.pop("MAAS_ADMIN_TOKEN", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"services.{name}",
                "--listen",
                address,
                "--grace",
                "1",
                *_flags(name, triton, tmp_path),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield address, log_path, process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _status(address: str, name: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
            )
        except grpc.RpcError:
            return None


def _until(predicate, what: str, logs: list[Path], process_list, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in process_list if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in logs)
            raise AssertionError(f"{what}: {'a process exited' if dead else 'timed out'}\n{tails}")
        time.sleep(0.2)


def test_a_wrong_triton_address_is_unready_with_the_reason_logged_then_ready_once_triton_answers(tmp_path):
    grpc_port, http_port, metrics_port = free_ports(3)  # nothing listens on grpc_port yet
    triton_address = f"127.0.0.1:{grpc_port}"
    with ExitStack() as stack:
        started = {
            name: stack.enter_context(service(name, triton_address, tmp_path)) for name in ("router", "registry")
        }
        logs = [log for _, log, _ in started.values()]
        processes = [p for _, _, p in started.values()]
        for name, (address, log, _) in started.items():
            _until(lambda: _status(address, "") == SERVING, f"{name} live", logs, processes)
            line = f"not ready: Triton at {triton_address} unreachable: UNAVAILABLE"
            _until(lambda: line in log.read_text(), f"{name} logs why it is not ready", logs, processes)
            # Live (liveness and startup probes pass: no restart loop), but not ready (out of the Service).
            assert _status(address, "") == SERVING, name
            assert _status(address, READINESS) == NOT_SERVING, name
            assert '"level": "WARNING"' in next(x for x in log.read_text().splitlines() if line in x)

        # Triton comes up on that very address: both turn ready by themselves, and say so.
        repository = tmp_path / "triton-models"
        repository.mkdir()
        stack.enter_context(
            LocalTriton(
                TritonConfig(
                    model_repository=repository,
                    work_dir=tmp_path / "triton",
                    grpc_port=grpc_port,
                    http_port=http_port,
                    metrics_port=metrics_port,
                )
            )
        )
        for name, (address, log, _) in started.items():
            _until(lambda: _status(address, READINESS) == SERVING, f"{name} ready once Triton answers", logs, processes)
            assert '"msg": "ready"' in log.read_text(), name
            assert _status(address, "") == SERVING, name

        # SIGTERM (drain): readiness goes with "" to NOT_SERVING; the readiness loop does not turn it back.
        for name, (address, log, process) in started.items():
            process.terminate()
            assert process.wait(15) == 0, log.read_text()[-2000:]
