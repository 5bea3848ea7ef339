"""Run the chart's own pods with `podman kube play` (no Kubernetes): the container profile
deploy/helm/maas-mesh/ci/podman-values.yaml, rendered by `helm template`. Every Deployment is played
as rendered (command, args, env, ConfigMaps, Secrets, volumes, security contexts, ports).

What kube play cannot do is bridged, each bridge here and nowhere else (docs/containers.md lists them):
- PersistentVolumeClaim: podman volumes of the claims' names, made before the play (kube play refuses
  a claim whose volume exists, and a cluster's claim would be provisioned before the pods anyway),
  owned by the fsGroup of the pod that writes them, as the kubelet applies fsGroup to a volume. The
  model repository's is filled from model_repository/ (`make models`): all of it for a Triton-only
  play, or only the files services read beside a model (tokenizer.json, preprocess.json, labels) when
  the registry is played too; it then registers the versions itself.
- emptyDir: podman 4.3 maps every emptyDir onto a *named* volume of the same name ("tmp", "shm"),
  shared by every pod that uses the name; here each becomes a fresh per-run directory (hostPath),
  mode 1777 as a kubelet's emptyDir is.
- Secret: podman 4.3's kube play stores a Secret it plays as YAML but reads a secretKeyRef's secret as
  a JSON map of key -> base64 value (and fails on its own), so each rendered Secret is created as a
  podman secret holding its `data` in that form.
- containerPort: podman 4.3 publishes every containerPort on the host (a cluster publishes only a
  hostPort): the played copy keeps only ports with a hostPort (the profile has none), so the pods'
  9090s do not collide; peers reach every port on the network anyway, and the probes read the port
  names from the rendered spec.
- Services: one podman network; each pod joins it with a DNS alias (aardvark-dns) for the name of
  every Service whose selector matches its labels, so peers reach each other by the chart's names.
  The host (a test) reaches a pod by its address on that network.
- Probes: podman 4.3 runs no gRPC probe and no startup or readiness probe, and turns an httpGet
  liveness probe into a `curl` health check (no curl in the images; a named port becomes port 0), so
  the played copy has none; `probe()` runs the chart's startup, readiness and liveness probes from
  the rendered spec as the kubelet would (grpc.health.v1 Check, HTTP GET 200-399).
- HPA, PodDisruptionBudget, NetworkPolicy: not played (the profile renders none of them).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
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
# Beside a model, what the services read (tokenizer: tokenizer.json & co, vision: preprocess.json;
# labels are sent with the registration).
PREPROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocess.json")


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


def render(release: str = "ct", values: Path = VALUES, *sets: str) -> list[dict]:
    extra = [a for s in sets for a in ("--set", s)]
    out = subprocess.run(
        [str(HELM), "template", release, str(CHART), "-f", str(values), *extra],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def named(docs: list[dict], kind: str, suffix: str) -> str:
    """The name of the one rendered `kind` whose name ends with `suffix` (e.g. "-triton")."""
    return next(d["metadata"]["name"] for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def service_aliases(docs: list[dict], deployment: dict) -> list[str]:
    """Names of the Services that select this Deployment's pods (what a cluster's DNS would resolve)."""
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    return sorted(
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Service" and d["spec"].get("selector") and d["spec"]["selector"].items() <= labels.items()
    )


class Play:
    """The chosen Deployments of a rendered chart under kube play; stop() removes all it made."""

    def __init__(self, docs: list[dict], deployments: list[str], work: Path) -> None:
        self.docs, self.work = docs, work
        by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        self.deployments = [by_name[name] for name in deployments]  # in play order
        self.claims = [d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"]
        self.secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
        self.manifests: list[Path] = []

    def spec(self, deployment: str) -> dict:
        return next(d for d in self.deployments if d["metadata"]["name"] == deployment)["spec"]["template"]["spec"]

    def _bridge(self, dep: dict, generation: int = 0) -> dict:
        """The Deployment as played: a copy with the bridges applied (the rendered one stays as is).
        `generation` > 0: a replayed pod, whose emptyDirs are fresh directories of their own."""
        dep = copy.deepcopy(dep)
        for c in dep["spec"]["template"]["spec"]["containers"]:
            c["ports"] = [p for p in c.get("ports", []) if "hostPort" in p]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                c.pop(probe, None)  # run by probe() instead
        for vol in dep["spec"]["template"]["spec"].get("volumes", []):
            if "emptyDir" in vol:
                d = self.work / (dep["metadata"]["name"] + (f"-{generation}" if generation else "")) / vol["name"]
                d.mkdir(parents=True)
                d.chmod(0o1777)
                vol.pop("emptyDir")
                vol["hostPath"] = {"path": str(d), "type": "Directory"}
        return dep

    def _claim_owner(self, claim: str) -> int:
        """fsGroup of the played pod that mounts the claim read-write (else of any that mounts it)."""
        owners = []
        for dep in self.deployments:
            spec = dep["spec"]["template"]["spec"]
            for vol in spec.get("volumes", []):
                pvc = vol.get("persistentVolumeClaim")
                if pvc and pvc["claimName"] == claim:
                    owners.append((bool(pvc.get("readOnly")), spec.get("securityContext", {}).get("fsGroup", 0)))
        return sorted(owners)[0][1] if owners else 0

    def _provision(self, claim: str, model_repository: Path | None, whole: bool) -> None:
        """A podman volume for the claim, its root owned by the writer's fsGroup; the model repository's
        filled from model_repository/ (whole, or only the preprocessing files)."""
        owner = self._claim_owner(claim)
        podman("volume", "create", claim)
        tar = self.work / f"{claim}.tar"
        with tarfile.open(tar, "w") as t:

            def add(path: Path | None, arcname: str) -> None:
                info = tarfile.TarInfo(arcname) if path is None else t.gettarinfo(str(path), arcname=arcname)
                if path is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                info.uid = info.gid = owner  # e.g. the registry (uid 10001) writes versions into it
                info.uname = info.gname = ""
                if info.isfile():
                    with open(path, "rb") as f:
                        t.addfile(info, f)
                else:
                    t.addfile(info)

            add(None, ".")
            if model_repository is not None:
                for path in sorted(model_repository.rglob("*")):
                    rel = path.relative_to(model_repository)
                    if (
                        whole
                        or path.is_dir()
                        and len(rel.parts) == 1
                        or path.is_file()
                        and len(rel.parts) == 2
                        and rel.name in PREPROCESSING_FILES
                    ):
                        add(path, f"./{rel}")
        podman("volume", "import", claim, str(tar))
        tar.unlink()

    def start(
        self,
        models_claim: str | None = None,
        model_repository: Path = REPO / "model_repository",
        whole_repository: bool = True,
        skip_models: tuple[str, ...] = (),
    ) -> "Play":
        """Provision the claims, then play each Deployment on the network with its Services' aliases.
        skip_models: model folders left out of a preprocessing-only fill (e.g. the chat model)."""
        self.stop()  # leftovers of an interrupted run
        self.work.mkdir(parents=True)
        podman("network", "create", NETWORK)
        source = None
        if models_claim:
            source = self.work / "source"
            shutil.copytree(
                model_repository, source, symlinks=True, ignore=shutil.ignore_patterns(".build-*", *skip_models)
            )
        for claim in self.claims:
            self._provision(claim, source if claim == models_claim else None, whole_repository)
        if source is not None:
            shutil.rmtree(source)
        for secret in (d for d in self.docs if d["kind"] == "Secret"):
            path = self.work / f"secret-{secret['metadata']['name']}.json"
            data = {
                **secret.get("data", {}),
                **{k: base64.b64encode(v.encode()).decode() for k, v in secret.get("stringData", {}).items()},
            }
            path.write_text(json.dumps(data))
            podman("secret", "create", secret["metadata"]["name"], str(path))
            path.unlink()
        configmaps = [d for d in self.docs if d["kind"] == "ConfigMap"]
        for dep in self.deployments:
            manifest = self.work / f"play-{dep['metadata']['name']}.yaml"
            manifest.write_text(yaml.safe_dump_all(configmaps + [self._bridge(dep)]))
            self.manifests.append(manifest)
            aliases = ",".join(f"alias={a}" for a in service_aliases(self.docs, dep))
            podman("kube", "play", "--network", f"{NETWORK}:{aliases}" if aliases else NETWORK, str(manifest))
        return self

    def replay(self, dep: dict) -> None:
        """Play a changed rendering of one of the played Deployments in place of its pod (kube play
        --replace), as `helm upgrade` with a new value replaces a Deployment's pods."""
        name = dep["metadata"]["name"]
        index = next(i for i, d in enumerate(self.deployments) if d["metadata"]["name"] == name)
        self.deployments[index] = dep
        self._generation = getattr(self, "_generation", 0) + 1
        configmaps = [d for d in self.docs if d["kind"] == "ConfigMap"]
        manifest = self.work / f"play-{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(configmaps + [self._bridge(dep, self._generation)]))
        aliases = ",".join(f"alias={a}" for a in service_aliases(self.docs, dep))
        podman("kube", "play", "--replace", "--network", f"{NETWORK}:{aliases}" if aliases else NETWORK, str(manifest))

    # -- the pods ------------------------------------------------------------------------------------
    def pod(self, deployment: str) -> str:
        return f"{deployment}-pod-0"

    def container(self, deployment: str, name: str | None = None) -> str:
        return f"{self.pod(deployment)}-{name or self.spec(deployment)['containers'][0]['name']}"

    def address(self, deployment: str) -> str:
        infra = podman("pod", "inspect", self.pod(deployment), "--format", "{{.InfraContainerID}}").strip()
        return podman("inspect", infra, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").strip()

    def port(self, deployment: str, name: str) -> int:
        c = self.spec(deployment)["containers"][0]
        return next(p["containerPort"] for p in c["ports"] if p["name"] == name)

    def logs(self, deployment: str, tail: int = 30) -> str:
        r = subprocess.run(
            ["podman", "logs", "--tail", str(tail), self.container(deployment)], capture_output=True, text=True, env=ENV
        )
        return r.stdout + r.stderr

    def restarts(self, deployment: str) -> int:
        return int(podman("inspect", self.container(deployment), "--format", "{{.RestartCount}}").strip() or 0)

    def kill(self, deployment: str) -> None:
        """SIGKILL the container's main process from outside, as a crash (podman kill/stop would count as
        a stop by the user, which a restart policy leaves stopped)."""
        pid = int(podman("inspect", self.container(deployment), "--format", "{{.State.Pid}}").strip())
        os.kill(pid, signal.SIGKILL)

    def probe(self, deployment: str, kind: str = "readinessProbe", timeout: float = 2.0) -> bool:
        """One run of the chart's probe `kind` of the first container, as the kubelet runs it."""
        c = self.spec(deployment)["containers"][0]
        p = c[kind]
        host = self.address(deployment)
        if "grpc" in p:
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(f"{host}:{p['grpc']['port']}") as channel:
                try:
                    status = (
                        health_pb2_grpc.HealthStub(channel)
                        .Check(health_pb2.HealthCheckRequest(service=p["grpc"].get("service", "")), timeout=timeout)
                        .status
                    )
                except grpc.RpcError:
                    return False
                return status == health_pb2.HealthCheckResponse.SERVING
        get = p["httpGet"]
        port = get["port"] if isinstance(get["port"], int) else self.port(deployment, get["port"])
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{get['path']}", timeout=timeout) as r:
                return 200 <= r.status < 400
        except OSError:
            return False

    def wait_ready(self, deployment: str, timeout: float | None = None) -> float:
        """Seconds until the startup probe, then the readiness probe pass. The timeout defaults to the
        startup probe's budget (periodSeconds x failureThreshold) plus the readiness one's, as the kubelet
        would give it; the error says which probe failed, with the container's log tail."""
        c = self.spec(deployment)["containers"][0]
        start = time.monotonic()
        for kind in ("startupProbe", "readinessProbe"):
            p = c.get(kind)
            if p is None:
                continue
            budget = timeout or p.get("periodSeconds", 10) * p.get("failureThreshold", 3)
            deadline = time.monotonic() + budget
            while not self.probe(deployment, kind):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{deployment}: {kind} did not pass within {budget:.0f} s; log tail:\n{self.logs(deployment)}"
                    )
                time.sleep(0.25)
        return time.monotonic() - start

    def wait_http_probe(self, deployment: str, probe: str = "readinessProbe", timeout: float = 300) -> float:
        """Seconds until the chart's probe `probe` passes (kept for the Triton-only bench)."""
        start = time.monotonic()
        while not self.probe(deployment, probe):
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"{deployment}: {probe} not ready after {timeout:.0f} s; log tail:\n{self.logs(deployment, 20)}"
                )
            time.sleep(0.25)
        return time.monotonic() - start

    def stop(self) -> None:
        """Everything this play (or an interrupted earlier one in the same work dir) made."""
        for manifest in sorted(self.work.glob("play-*.yaml")) if self.work.is_dir() else []:
            podman("kube", "down", str(manifest), check=False)
        for dep in self.deployments:
            podman("pod", "rm", "-f", "--ignore", self.pod(dep["metadata"]["name"]), check=False)
        for claim in self.claims:
            podman("volume", "rm", "-f", claim, check=False)
        for secret in self.secrets:
            podman("secret", "rm", secret, check=False)
        podman("network", "rm", "-f", NETWORK, check=False)
        shutil.rmtree(self.work, ignore_errors=True)
        self.manifests = []
