"""Self-healing `maas up`: a component that dies is restarted with back-off while the others serve,
Triton comes back with every live version loaded, and a crash loop is given up on with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from maas.cli.mesh import cat_photo
from maas.client import MeshClient, MeshError
from maas.local.mesh import FREE_PORTS, SOURCE_MODELS, LocalMesh, MeshConfig
from maas.local.supervisor import RestartPolicy, Supervisor, read_status

BASIC = [m for m in SOURCE_MODELS if m.name in ("minilm", "efficientnet_lite0")]


@pytest.fixture(scope="module")
def healing_mesh(tmp_path_factory):
    local = LocalMesh(MeshConfig(state_dir=tmp_path_factory.mktemp("healing"), ports=FREE_PORTS, models=BASIC))
    with local:
        supervisor = Supervisor(local, RestartPolicy(initial_backoff=0.2, max_restarts=3, window=300))
        supervisor.start()
        try:
            yield local, supervisor
        finally:
            supervisor.stop()


def kill(mesh: LocalMesh, name: str) -> None:
    proc = mesh.triton.process if name == "triton" else mesh.processes[name]
    os.killpg(proc.pid, signal.SIGKILL)


def until(check, timeout: float = 90.0):
    """Polls check() (MeshError and gRPC errors count as not yet) and returns its first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (MeshError, grpc.RpcError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not healed within {timeout:.0f}s")
        time.sleep(0.2)


def test_a_killed_tokenizer_is_restarted_and_vision_serves_meanwhile(healing_mesh):
    mesh, supervisor = healing_mesh
    with MeshClient(mesh.router_address, timeout=10) as client:
        kill(mesh, "tokenizer")
        # Classification does not need the tokenizer: it keeps working while the tokenizer is down.
        assert client.classify([cat_photo()], "efficientnet_lite0").results[0][0].index in range(281, 286)
        until(lambda: client.embed(["back again"], "minilm").vectors.shape == (1, 384))
    until(lambda: supervisor.status["tokenizer"].restarts == 1 and supervisor.status["tokenizer"].alive)
    assert supervisor.status["tokenizer"].last_exit == "signal 9"
    written = read_status(mesh.state_dir)["components"]["tokenizer"]
    assert written["restarts"] == 1 and written["last_exit"] == "signal 9"


def test_a_killed_triton_comes_back_with_every_live_version(healing_mesh):
    mesh, supervisor = healing_mesh
    with MeshClient(mesh.router_address, timeout=10) as client:
        started = time.monotonic()
        kill(mesh, "triton")
        until(lambda: client.classify([cat_photo()], "efficientnet_lite0").results)
        print(f"recovery after a Triton kill: {time.monotonic() - started:.1f}s")
        until(lambda: client.embed(["x"], "minilm").vectors.shape == (1, 384))
    assert supervisor.status["triton"].restarts == 1


def test_maas_status_shows_the_restarts(healing_mesh):
    mesh, _ = healing_mesh
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from maas.cli import main; main()",
            "status",
            "--state-dir",
            str(mesh.state_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    components = json.loads(out)["components"]
    assert components["tokenizer"]["restarts"] >= 1 and components["router"]["alive"]


def test_a_crash_loop_is_given_up_on_with_the_reason(healing_mesh):
    mesh, supervisor = healing_mesh
    for _ in range(4):  # max_restarts=3: the fourth crash within the window ends it
        until(lambda: mesh.alive()["vision"])
        kill(mesh, "vision")
        until(lambda: not supervisor.status["vision"].alive or supervisor.status["vision"].gave_up, timeout=30)
        until(lambda: supervisor.status["vision"].alive or supervisor.status["vision"].gave_up)
    assert supervisor.failed.is_set()
    assert "vision crashed 4 times" in supervisor.status["vision"].gave_up
