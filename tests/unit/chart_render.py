"""Render the Helm chart with the locally installed helm (tools/install_k8s_tools.sh) and walk the result."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "maas-mesh"
HELM = ROOT / ".tools" / "bin" / "helm"
RELEASE = "mesh"
NAMESPACE = "ml"
FULLNAME = f"{RELEASE}-maas-mesh"

# Our four gRPC services, the OpenAI HTTP gateway and Triton; the registry is the only stateful one.
SERVICES = ("router", "registry", "tokenizer", "vision")
GATEWAY = "openai"
CONSOLE = "console"
COMPONENTS = SERVICES + (GATEWAY, CONSOLE, "triton")
STATELESS = ("router", "tokenizer", "vision", GATEWAY, "triton")
SCENARIOS = [None] + sorted(p.name for p in (CHART / "ci").glob("*.yaml"))


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def values_args(scenario: str | None, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["-f", str(CHART / "ci" / scenario)] if scenario else []
    for s in sets:
        args += ["--set", s]
    return args


def template(scenario: str | None = None, *sets: str) -> subprocess.CompletedProcess:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(scenario, sets))


@functools.lru_cache(maxsize=None)
def render(scenario: str | None = None, *sets: str) -> tuple[dict, ...]:
    """Every object `helm template` renders for a ci/ file (None = defaults) plus --set overrides."""
    proc = template(scenario, *sets)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed for {scenario} {sets}:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def kind(docs, kind_: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind_]


def by_name(docs, kind_: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in kind(docs, kind_)}


def name(component: str) -> str:
    return f"{FULLNAME}-{component}"


def deployment(docs, component: str) -> dict:
    return by_name(docs, "Deployment")[name(component)]


def pod_spec(docs, component: str) -> dict:
    return deployment(docs, component)["spec"]["template"]["spec"]


def container(docs, component: str) -> dict:
    (c,) = pod_spec(docs, component)["containers"]
    return c


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def pods(docs) -> Iterator[tuple[str, dict]]:
    """(workload name, pod spec) for every pod template rendered."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def component_of(d: dict) -> str:
    return d["metadata"]["labels"]["app.kubernetes.io/component"]
