"""The whole mesh from the chart's own pods under podman (tools/podman_kube.py): Triton, registry,
tokenizer, vision and router of the container profile, ready and with the models registered.

    with PodmanMesh(REPO / "build/cluster") as mesh:      # render -> play -> probes -> register
        MeshClient(mesh.address("router", "grpc"))

The models are registered through the registry's API from the host (what `maas up` does on first
start, and a user with `maas models register` after `helm install`). The chat model (smollm2) is
left out of this profile: docs/containers.md.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

from maas.local.mesh import SOURCE_MODELS, register_source_models
from tools import podman_kube as pk

# Play order: each starts once its peers' names resolve (a cluster starts them in any order; the
# services retry their peers, so the order only saves retries).
COMPONENTS = ("triton", "registry", "tokenizer", "vision", "router")
LEFT_OUT = ("smollm2",)  # the chat model: 540 MB of weights and a slow load on 2 CPU cores
MODELS = tuple(m for m in SOURCE_MODELS if m.name not in LEFT_OUT)
IMAGES = ("localhost/maas-mesh:0.1.0", "localhost/maas-triton-cpu:0.1.0")


class PodmanMesh:
    def __init__(
        self,
        work: Path,
        *sets: str,
        model_repository: Path = pk.REPO / "model_repository",
        register_timeout: float = 600.0,
    ) -> None:
        self.work, self.sets, self.model_repository = work, sets, model_repository
        self.register_timeout = register_timeout
        self.docs: list[dict] = []
        self.play: pk.Play | None = None
        self.names: dict[str, str] = {}
        self.start_to_ready_s = self.registered_s = 0.0

    # -- names and addresses -------------------------------------------------------------------------
    def deployment(self, component: str) -> str:
        return self.names[component]

    def address(self, component: str, port: str = "grpc") -> str:
        """host:port of a pod's named port on the podman network (reachable from this host)."""
        d = self.names[component]
        return f"{self.play.address(d)}:{self.play.port(d, port)}"

    @property
    def admin_token(self) -> str:
        """The registry's admin token, from the Secret the chart rendered (kubectl get secret)."""
        secret = next(d for d in self.docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-admin-token"))
        return base64.b64decode(secret["data"]["token"]).decode()

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, register: bool = True) -> "PodmanMesh":
        missing = [ref for ref in IMAGES if not pk.image_exists(ref)]
        if missing:
            raise RuntimeError(f"image(s) {', '.join(missing)} not built: run `make images`")
        started = time.monotonic()
        self.docs = pk.render("ct", pk.VALUES, *self.sets)
        self.names = {c: pk.named(self.docs, "Deployment", f"-{c}") for c in COMPONENTS}
        self.play = pk.Play(self.docs, [self.names[c] for c in COMPONENTS], self.work)
        try:
            self.play.start(
                models_claim=pk.named(self.docs, "PersistentVolumeClaim", "-models"),
                model_repository=self.model_repository,
                whole_repository=False,
                skip_models=LEFT_OUT,
            )
            self.wait_ready()
            self.start_to_ready_s = time.monotonic() - started
            if register:
                self.register()
                self.registered_s = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Every pod's startup then readiness probe, as the chart defines them."""
        for component in COMPONENTS:
            self.play.wait_ready(self.names[component])

    def register(self) -> list[tuple[str, int]]:
        from maas.registry_client import RegistryClient

        with RegistryClient(self.address("registry"), token=self.admin_token, timeout=60) as registry:
            done = register_source_models(
                registry,
                self.model_repository,
                MODELS,
                self.register_timeout,
                registry_log=lambda: self.play.logs(self.names["registry"]),
            )
        self.wait_routable()
        return done

    def wait_routable(self, timeout: float = 120.0) -> None:
        """Until the router routes every model (OIP ModelReady through it: registry state + Triton)."""
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address("router")) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for model in (m.name for m in MODELS):
                while True:
                    try:
                        if stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=2).ready:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"the router does not route {model} after {timeout:.0f} s; router log:\n"
                            f"{self.play.logs(self.names['router'])}"
                        )
                    time.sleep(0.2)

    def stop(self) -> None:
        if self.play is not None:
            self.play.stop()

    def __enter__(self) -> "PodmanMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
