"""`kubectl maas ...` through the real kubectl binary's plugin mechanism, against a real registry.

The cluster side is a fake `kubectl` first on PATH (the plugin runs `kubectl port-forward` from PATH): it
records its arguments, and for port-forward prints kubectl's "Forwarding from 127.0.0.1:<port>" line
naming the real registry's port - what a working port-forward to the registry Service amounts to.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from maas.v1 import registry_pb2 as pb
from tests.fixtures.registry import header, tiny_onnx, upload_messages, wait_state

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0

FAKE_KUBECTL = """\
import json, os, signal, sys, time

def record(entry):
    with open(os.environ["FAKE_KUBECTL_RECORD"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

args = sys.argv[1:]
record({"argv": args})
if args[:2] == ["get", "services"]:
    print(os.environ.get("FAKE_KUBECTL_SERVICES", ""))
    sys.exit(0)
if args[:1] == ["port-forward"]:
    if os.environ.get("FAKE_KUBECTL_FAIL"):
        print('error: services "%s" not found' % args[1][4:], file=sys.stderr)
        sys.exit(1)
    def stopped(*_):
        record({"event": "terminated"})
        sys.exit(0)
    signal.signal(signal.SIGTERM, stopped)
    print("Forwarding from 127.0.0.1:%s -> 50052" % os.environ["FAKE_FORWARD_PORT"], flush=True)
    print("Forwarding from [::1]:%s -> 50052" % os.environ["FAKE_FORWARD_PORT"], flush=True)
    while True:
        time.sleep(0.1)
sys.exit("fake kubectl: unexpected arguments %r" % args)
"""


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def kubectl() -> str:
    """The real kubectl: .tools/bin from `make k8s-tools` (tools/install_k8s_tools.sh), else PATH's."""
    found = REPO / ".tools" / "bin" / "kubectl"
    path = str(found) if os.access(found, os.X_OK) else shutil.which("kubectl")
    if path is None:
        pytest.skip("no kubectl binary: run `make k8s-tools`")
    return path


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A directory holding the `kubectl-maas` console script: the venv's bin when the project is installed,
    else the same wrapper pip would generate from pyproject's [project.scripts] entry."""
    venv_bin = Path(sys.executable).parent
    if (venv_bin / "kubectl-maas").exists():
        return venv_bin
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["kubectl-maas"]
    module, function = entry.split(":")
    bin_dir = tmp_path_factory.mktemp("bin")
    executable(
        bin_dir / "kubectl-maas",
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        f"from {module} import {function}\nsys.exit({function}())\n",
    )
    return bin_dir


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@dataclass
class Env:
    kubectl: str
    vars: dict[str, str]
    record: Path

    async def run(self, *args: str, **extra_env: str) -> Result:
        """`kubectl <args>` (the real binary), without blocking the loop the registry serves on."""
        proc = await asyncio.create_subprocess_exec(
            self.kubectl,
            *args,
            env={**self.vars, **extra_env},
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return Result(proc.returncode, out.decode(), err.decode())

    def calls(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls() if "argv" in c]

    def forward_stopped(self) -> bool:
        return {"event": "terminated"} in self.calls()


@pytest.fixture
def env(kubectl, plugin_dir, tmp_path) -> Env:
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    executable(fake_bin / "kubectl", f"#!{sys.executable}\n{FAKE_KUBECTL}")
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("MAAS_", "FAKE_"))}
    variables.update(
        PATH=os.pathsep.join([str(fake_bin), str(plugin_dir), os.environ.get("PATH", "")]),
        FAKE_KUBECTL_RECORD=str(tmp_path / "kubectl-calls.jsonl"),
        KUBECONFIG=str(tmp_path / "no-kubeconfig"),  # nothing here may reach a real cluster
        COLUMNS="200",
        NO_COLOR="1",
    )
    return Env(kubectl, variables, tmp_path / "kubectl-calls.jsonl")


async def register_tiny(registry) -> int:
    data = tiny_onnx(2.0)
    v = await registry.stub.RegisterVersion(upload_messages(header("tiny", data), data))
    v = await wait_state(registry.stub, "tiny", v.version)
    assert v.state == pb.VERSION_STATE_READY, v.state_reason
    return v.version


async def test_kubectl_plugin_list_shows_kubectl_maas(env, plugin_dir):
    result = await env.run("plugin", "list")
    assert result.code == 0, result.stderr
    assert str(plugin_dir / "kubectl-maas") in result.stdout.splitlines()


async def test_help_runs_no_kubectl(env):
    for args in (["maas", "--help"], ["maas", "models", "--help"], ["maas", "models", "list", "-h"], ["maas"]):
        result = await env.run(*args)
        assert result.code in (0, 2), result.stderr  # no arguments: usage, exit 2 (click)
        assert "models" in result.stdout + result.stderr
    assert env.argvs() == []  # help needs no cluster


async def test_models_commands_with_registry_flag(env, registry_env):
    """Against any registry address, e.g. a local mesh from `maas up`: no kubectl involved."""
    await register_tiny(registry_env)
    await register_tiny(registry_env)
    address = registry_env.address

    result = await env.run("maas", "models", "list", "--registry", address, "--json")
    assert result.code == 0, result.stderr
    [model] = json.loads(result.stdout)
    assert model["name"] == "tiny" and [int(v["version"]) for v in model["versions"]] == [1, 2]

    result = await env.run("maas", "models", "alias", "tiny", "production", "1", "--registry", address)
    assert result.code == 0, result.stderr
    result = await env.run(
        "maas", "models", "alias", "tiny", "production", "2", "-r", "better", MAAS_REGISTRY_ADDRESS=address
    )
    assert result.code == 0 and "production → v2 (was v1)" in result.stdout, result.stdout + result.stderr
    result = await env.run(
        "maas", "--registry", address, "models", "traffic", "tiny", "production=90", "1=10", "--json"
    )
    assert result.code == 0, result.stderr
    assert sorted(int(t["weight"]) for t in json.loads(result.stdout)["split"]) == [10, 90]
    result = await env.run("maas", "models", "rollback", "tiny", "--registry", address, "--json")
    assert result.code == 0, result.stderr
    back = json.loads(result.stdout)
    assert (int(back["version"]), int(back["previous_version"])) == (1, 2)

    result = await env.run("maas", "models", "alias", "tiny", "production", "9", "--registry", address)
    assert result.code == 1 and "version 9" in result.stderr  # the registry's own message
    assert env.argvs() == []


async def test_port_forward_to_the_release_registry(env, registry_env):
    await register_tiny(registry_env)
    port = registry_env.address.rsplit(":", 1)[1]
    result = await env.run(
        "maas",
        "-n",
        "models",
        "--release",
        "prod",
        "--context",
        "kind-x",
        "--kubeconfig",
        "/tmp/kc",
        "models",
        "list",
        "--json",
        FAKE_FORWARD_PORT=port,
    )
    assert result.code == 0, result.stderr
    assert [m["name"] for m in json.loads(result.stdout)] == ["tiny"]
    assert env.argvs() == [
        [
            "port-forward",
            "svc/prod-maas-mesh-registry",
            ":50052",
            "--address",
            "127.0.0.1",
            "--namespace",
            "models",
            "--context",
            "kind-x",
            "--kubeconfig",
            "/tmp/kc",
        ]
    ]
    assert env.forward_stopped()


async def test_port_forward_is_stopped_when_the_command_fails(env, registry_env):
    port = registry_env.address.rsplit(":", 1)[1]
    result = await env.run("maas", "--release", "prod", "models", "rollback", "absent", FAKE_FORWARD_PORT=port)
    assert result.code == 1 and "absent" in result.stderr
    assert env.forward_stopped()


async def test_registry_service_found_by_labels(env, registry_env):
    port = registry_env.address.rsplit(":", 1)[1]
    result = await env.run(
        "maas",
        "-n",
        "team",
        "models",
        "list",
        FAKE_FORWARD_PORT=port,
        FAKE_KUBECTL_SERVICES="service/blue-maas-mesh-registry",
    )
    assert result.code == 0, result.stderr
    lookup, forward = env.argvs()
    assert lookup == [
        "get",
        "services",
        "-l",
        "app.kubernetes.io/part-of=maas-mesh,app.kubernetes.io/component=registry",
        "-o",
        "name",
        "--namespace",
        "team",
    ]
    assert forward[:2] == ["port-forward", "svc/blue-maas-mesh-registry"]


async def test_ambiguous_or_missing_registry_is_an_error(env):
    result = await env.run(
        "maas", "models", "list", FAKE_KUBECTL_SERVICES="service/a-maas-mesh-registry\nservice/b-maas-mesh-registry"
    )
    assert result.code == 1
    assert "a-maas-mesh-registry, b-maas-mesh-registry" in result.stderr and "--release" in result.stderr
    result = await env.run("maas", "-n", "empty", "models", "list", FAKE_KUBECTL_SERVICES="")
    assert result.code == 1 and "no MaaS Mesh registry Service in namespace 'empty'" in result.stderr
    assert all(argv[0] == "get" for argv in env.argvs())  # no port-forward attempted


async def test_port_forward_failure_shows_kubectl_error(env):
    result = await env.run("maas", "--release", "nope", "models", "list", FAKE_KUBECTL_FAIL="1")
    assert result.code == 1
    assert 'services "nope-maas-mesh-registry" not found' in result.stderr


async def test_sigterm_during_a_streaming_command_stops_the_port_forward(env, registry_env):
    """kubectl execs the plugin in its own place, so a signal to `kubectl maas` reaches the plugin."""
    port = registry_env.address.rsplit(":", 1)[1]
    proc = await asyncio.create_subprocess_exec(
        env.kubectl,
        "maas",
        "--release",
        "prod",
        "models",
        "watch",
        env={**env.vars, "FAKE_FORWARD_PORT": port},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        first_line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)  # the watch is streaming
        assert first_line, (await proc.stderr.read()).decode()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 128 + 15
    assert env.forward_stopped()
