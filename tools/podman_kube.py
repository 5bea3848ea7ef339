"""Run the chart's own pods with `podman kube play` (no Kubernetes): the container profile
deploy/helm/maas-mesh/ci/podman-values.yaml, rendered by `helm template`.

What kube play cannot do is bridged, each bridge here and nowhere else:
- PersistentVolumeClaim: podman volumes of the claims' names, made before the play (kube play refuses
  a claim whose volume exists, and a cluster's claim would be provisioned before the pods anyway);
  the model repository's is filled from model_repository/ (`make models`).
- emptyDir: podman 4.3 maps every emptyDir onto a *named* volume of the same name ("tmp", "shm"),
  shared by every pod that uses the name; here each becomes a fresh per-run directory (hostPath),
  mode 1777 as a kubelet's emptyDir is.
- Services: one podman network; the test reaches a pod by its address on it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy/helm/maas-mesh"
VALUES = CHART / "ci/podman-values.yaml"
HELM = REPO / ".tools/bin/helm"
NETWORK = "maas-mesh-ct"
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy/podman/containers.conf")}


def podman(*args: str, check: bool = True) -> str:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV)
    if check and r.returncode:
        raise RuntimeError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def exists(kind: str, name: str) -> bool:
    return subprocess.run(["podman", kind, "exists", name], env=ENV).returncode == 0


def image_exists(ref: str) -> bool:
    return shutil.which("podman") is not None and exists("image", ref)


def image_mb(ref: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).strip()) / 1e6


def render(release: str = "ct", values: Path = VALUES) -> list[dict]:
    out = subprocess.run([str(HELM), "template", release, str(CHART), "-f", str(values)],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


class Play:
    """The chosen Deployments of a rendered chart under kube play; stop() removes all it made."""

    def __init__(self, docs: list[dict], deployments: list[str], work: Path) -> None:
        self.docs, self.work = docs, work
        self.deployments = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] in deployments]
        self.claims = [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"]
        self.manifest = work / "play.yaml"

    def _bridge(self, dep: dict) -> dict:
        for vol in dep["spec"]["template"]["spec"].get("volumes", []):
            if "emptyDir" in vol:
                d = self.work / dep["metadata"]["name"] / vol["name"]
                d.mkdir(parents=True)
                d.chmod(0o1777)
                vol.pop("emptyDir")
                vol["hostPath"] = {"path": str(d), "type": "Directory"}
        return dep

    def start(self, models_claim: str | None = None, model_repository: Path = REPO / "model_repository") -> "Play":
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        if not exists("network", NETWORK):
            podman("network", "create", NETWORK)
        for claim in self.claims:
            if not exists("volume", claim):
                podman("volume", "create", claim)
        if models_claim:
            tar = self.work / "models.tar"
            with tarfile.open(tar, "w") as t:
                def owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
                    if "/.build-" in f"/{info.name}":
                        return None
                    info.uid = info.gid = 10001  # the registry (uid 10001) writes versions into it
                    return info
                t.add(model_repository, arcname=".", filter=owned)
            podman("volume", "import", models_claim, str(tar))
            tar.unlink()
        passthrough = [d for d in self.docs if d["kind"] in ("ConfigMap", "Secret")]
        self.manifest.write_text(yaml.safe_dump_all(passthrough + [self._bridge(d) for d in self.deployments]))
        podman("kube", "play", "--network", NETWORK, str(self.manifest))
        return self

    def container(self, deployment: str, name: str) -> str:
        return f"{deployment}-pod-0-{name}"

    def address(self, deployment: str) -> str:
        infra = podman("pod", "inspect", f"{deployment}-pod-0", "--format", "{{.InfraContainerID}}").strip()
        return podman("inspect", infra, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").strip()

    def wait_http_probe(self, deployment: str, probe: str = "readinessProbe", timeout: float = 300) -> float:
        """Seconds until the chart's own httpGet probe of the first container answers 200."""
        spec = next(d for d in self.deployments if d["metadata"]["name"] == deployment)["spec"]["template"]["spec"]
        c = spec["containers"][0]
        get = c[probe]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == port)
        url = f"http://{self.address(deployment)}:{port}{get['path']}"
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.25)
        logs = podman("logs", "--tail", "20", self.container(deployment, c["name"]), check=False)
        raise TimeoutError(f"{deployment}: {probe} {url} not ready after {timeout:.0f} s; log tail:\n{logs}")

    def stop(self) -> None:
        if self.manifest.exists():
            podman("kube", "down", str(self.manifest), check=False)
        for claim in self.claims:
            podman("volume", "rm", "-f", claim, check=False)
        podman("network", "rm", "-f", NETWORK, check=False)
        shutil.rmtree(self.work, ignore_errors=True)
