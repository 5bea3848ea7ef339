"""The whole mesh on one machine: Triton + registry + tokenizer + vision + router + the OpenAI HTTP
gateway + the web console, as subprocesses.

    with LocalMesh(MeshConfig()) as mesh:          # `maas up` (fixed default ports)
        MeshClient(mesh.router_address).embed(["hello"])

    LocalMesh(MeshConfig(state_dir=tmp, ports=FREE_PORTS))   # tests: free loopback ports

Triton serves the registry-owned working repository (<state_dir>/repository, explicit model control);
on first start the models of the source `model_repository/` are registered through the registry and
`production` points at them. Every component runs in its own process group and is stopped in reverse
order (also on failure and Ctrl-C); each dies with this process (PR_SET_PDEATHSIG), so none is orphaned.

Observability: each service serves Prometheus metrics on its own port (`metrics_addresses`). With OTEL_*
tracing set, every component gets those settings and its own OTEL_SERVICE_NAME, and Triton runs its
OpenTelemetry trace mode towards the OTLP/HTTP endpoint (see `triton_tracing_args`), so one request is
one trace from the router through the preprocessing service to Triton.

TLS (`MeshConfig(tls=True)`, `maas up --tls`): a local CA and a certificate per component under
<state_dir>/tls (maas/local/certs.py); every gRPC hop is mTLS (Triton with --grpc-use-ssl-mutual),
the OpenAI gateway and the console serve HTTPS, and callers use `client_tls` (ca.pem + client.pem).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas import ports
from maas.local.certs import LocalPki
from maas.local.processes import free_ports, spawn
from maas.local.triton import REPO, LocalTriton, TritonConfig
from maas.registry_client import RegistryClient, RegistryError
from maas.tls import ClientTls
from services.shared.telemetry import tracing_configured

# start order; stopped in reverse, Triton last
SERVICES = ("registry", "tokenizer", "vision", "router", "openai", "console")
HTTP_SERVICES = ("openai", "console")  # health is GET /healthz, not gRPC health
# Each service's Prometheus endpoint (<name>_metrics) takes any free port unless one is given.
DEFAULT_PORTS = {
    "router": ports.ROUTER,
    "registry": ports.REGISTRY,
    "tokenizer": ports.TOKENIZER,
    "vision": ports.VISION,
    "router_oip_fast": ports.ROUTER_OIP_FAST,
    "openai": ports.OPENAI,
    "console": ports.CONSOLE,
    "triton_grpc": ports.TRITON_GRPC,
    "triton_http": ports.TRITON_HTTP,
    "triton_metrics": ports.TRITON_METRICS,
    **{f"{name}_metrics": 0 for name in SERVICES},
}
FREE_PORTS = {name: 0 for name in DEFAULT_PORTS}


class MeshStartError(RuntimeError):
    """A component failed to start or a start-up step failed; the message says which and why."""


@dataclass(frozen=True)
class SourceModel:
    """How a model of the source repository is registered on first start."""

    name: str
    artifact: str  # relative to the model folder
    format: str
    preprocessing: tuple[str, str]
    postprocessing: tuple[str, str]
    top_k: int = 0
    labels_file: str = ""
    signature_from_config: bool = False  # TorchScript carries no signature: read config.pbtxt
    # Further versions registered after `artifact`, in order; `production` points at the last one.
    more_artifacts: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = ()  # per version, else a generic one
    # Version tags the router reads, e.g. max_sequence_length (its limit check before Triton).
    tags: tuple[tuple[str, str], ...] = ()


SOURCE_MODELS = (
    SourceModel(
        "minilm",
        "1/model.onnx",
        "onnx",
        ("tokenizer", "minilm"),
        ("embedding", "sentence_embedding"),
        tags=(("max_sequence_length", "512"),),
    ),  # BERT's position embeddings
    # The ONNX export (same tensors as the committed config's TorchScript model.pt): `maas models optimize
    # --int8` quantizes ONNX, and one Triton model serves one backend, so its int8 can be live beside it.
    SourceModel(
        "efficientnet_lite0",
        "1/model.onnx",
        "onnx",
        ("vision", "efficientnet_lite0"),
        ("softmax_top_k", "OUTPUT__0"),
        top_k=5,
        labels_file="labels.txt",
    ),
    # ONNX Runtime GenAI folders (docs/generation.md): v1 fp32 (the reference), v2 int4 (production).
    SourceModel(
        "smollm2",
        "1",
        "genai",
        ("tokenizer", "smollm2"),
        ("generation", ""),
        more_artifacts=("2",),
        descriptions=(
            "SmolLM2-135M-Instruct, fp32 (the reference export)",
            "SmolLM2-135M-Instruct, int4 (MatMulNBits)",
        ),
    ),
)


TRITON_SERVICE_NAME = "maas-triton"  # same as the chart's


def triton_otlp_http_endpoint(env: Mapping[str, str]) -> str | None:
    """Where Triton (which exports OTLP over HTTP only) sends spans: MAAS_TRITON_OTLP_HTTP_ENDPOINT if set
    (a base URL or a full .../v1/traces one), else the services' OTLP endpoint when it speaks HTTP; None
    when the services export over gRPC and no HTTP endpoint was given."""
    override = env.get("MAAS_TRITON_OTLP_HTTP_ENDPOINT", "").strip()
    if override:
        return override if override.rstrip("/").endswith("/v1/traces") else override.rstrip("/") + "/v1/traces"
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if not protocol.lower().startswith("http"):
        return None
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]  # per the spec: used as is
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def triton_sample_rate(env: Mapping[str, str]) -> int:
    """Triton's rate=N traces 1 request in N; OTEL_TRACES_SAMPLER_ARG is a ratio (0.1 → 10)."""
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if sampler.endswith("always_off"):
        return 0
    if not sampler.endswith("traceidratio"):
        return 1
    try:
        ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1"))
    except ValueError:
        return 1
    return 0 if ratio <= 0 else max(1, round(1 / min(ratio, 1.0)))


def triton_tracing_args(env: Mapping[str, str]) -> list[str]:
    """Triton's OpenTelemetry trace mode from the same OTEL_* settings the services read (empty when
    tracing is off, or when there is no OTLP/HTTP endpoint Triton could export to)."""
    if not tracing_configured(env) or env.get("OTEL_TRACES_EXPORTER", "otlp").lower() not in ("", "otlp"):
        return []
    url = triton_otlp_http_endpoint(env)
    rate = triton_sample_rate(env)
    if url is None or rate == 0:
        return []
    return [
        arg
        for setting in (
            "mode=opentelemetry",
            f"opentelemetry,url={url}",
            f"opentelemetry,resource=service.name={TRITON_SERVICE_NAME}",
            f"rate={rate}",
            "level=TIMESTAMPS",
        )
        for arg in ("--trace-config", setting)
    ]


@dataclass
class MeshConfig:
    source_repository: Path = REPO / "model_repository"
    state_dir: Path = Path(".maas")  # repository/, registry.sqlite3, triton/, logs/
    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))  # 0 = a free port
    models: Sequence[SourceModel] = SOURCE_MODELS  # registered on first start
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for every component
    service_args: Mapping[str, Sequence[str]] = field(default_factory=dict)  # extra flags per service
    triton_extra_args: Sequence[str] = ()
    startup_timeout: float = 180.0
    register_timeout: float = 600.0
    stop_grace: float = 10.0
    # How often the registry checks that Triton still serves every live version (a restarted Triton
    # comes back empty): short here, so a supervised restart is healed within seconds.
    reconcile_interval: float = 2.0
    # mTLS on every hop, HTTPS for the gateway and the console (certificates under <state_dir>/tls).
    tls: bool = False
    # Whether callers of the router must present a client certificate (internal hops always must).
    tls_client_auth: str = "required"


def _config_signature(model_dir: Path) -> tuple[list, list, int]:
    """(inputs, outputs, max_batch_size) from a committed config.pbtxt, as registry TensorSpecs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from maas.v1 import registry_pb2

    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig(), allow_unknown_field=True
    )

    def specs(tensors):
        return [
            registry_pb2.TensorSpec(
                name=t.name,
                shape=list(t.dims),
                datatype=model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"),
            )
            for t in tensors
        ]

    return specs(config.input), specs(config.output), int(config.max_batch_size)


def register_source_models(
    registry: RegistryClient,
    source: Path,
    models: Sequence[SourceModel],
    timeout: float,
    log: Callable[[str], None] = lambda message: None,
    registry_log: Callable[[], str] = lambda: "(not available)",
) -> list[tuple[str, int]]:
    """Register each of `models` from the source repository that the registry does not know yet, wait
    until READY and point `production` at its last version (`maas up` on first start; the container
    test against the chart's registry). Returns the (model, version)s registered."""
    source = source.resolve()
    registered = []
    known = {m.name: m for m in registry.list_models()}
    for model in models:
        existing = known.get(model.name)
        if existing is not None and existing.versions:
            continue
        folder = source / model.name
        artifacts = [folder / a for a in (model.artifact, *model.more_artifacts)]
        for artifact in artifacts:
            if not (artifact.is_dir() if model.format == "genai" else artifact.is_file()):
                raise MeshStartError(f"{artifact} is missing: build the models first (make models)")
        inputs, outputs, max_batch = _config_signature(folder)
        if model.format == "genai":  # the registry owns the generation contract's config
            inputs, outputs, max_batch = [], [], 0
        labels = (folder / model.labels_file).read_text().splitlines() if model.labels_file else []
        for i, artifact in enumerate(artifacts):
            log(f"registering {model.name} from {artifact.relative_to(source.parent)}")
            description = (
                model.descriptions[i]
                if i < len(model.descriptions)
                else f"{model.name} from the source model repository (first start of the local mesh)"
            )
            try:
                version = registry.register(
                    artifact,
                    model.name,
                    format=model.format,
                    inputs=inputs if model.signature_from_config else (),
                    outputs=outputs if model.signature_from_config else (),
                    preprocessing=model.preprocessing,
                    postprocessing=model.postprocessing,
                    top_k=model.top_k,
                    labels=labels,
                    max_batch_size=max_batch,
                    tags={
                        "source": "model_repository",
                        "source_path": f"{model.name}/{artifact.name}",
                        **dict(model.tags),
                    },
                    description=description,
                )
                registry.wait_ready(model.name, version.version, timeout=timeout)
            except RegistryError as exc:
                raise MeshStartError(
                    f"registering {model.name} failed: {exc}\nregistry log:\n{registry_log()}"
                ) from None
            registered.append((model.name, version.version))
        try:
            registry.set_alias(model.name, "production", version.version, reason="first start of the local mesh")
        except RegistryError as exc:
            raise MeshStartError(f"pointing production of {model.name} at v{version.version} failed: {exc}") from None
    return registered


class LocalMesh:
    def __init__(self, config: MeshConfig | None = None, log: Callable[[str], None] | None = None):
        self.config = config or MeshConfig()
        self.log = log or (lambda message: None)
        self.triton: LocalTriton | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.registered: list[tuple[str, int]] = []  # (model, version) registered by this start
        self.pki: LocalPki | None = None
        self._lock = threading.Lock()

    # -- paths and addresses -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return Path(self.config.state_dir).resolve()

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def router_address(self) -> str:
        return self.addresses["router"]

    @property
    def registry_address(self) -> str:
        return self.addresses["registry"]

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls else "http"

    @property
    def openai_url(self) -> str:
        """Base URL for OpenAI clients: OpenAI(base_url=mesh.openai_url, api_key="unused")."""
        return f"{self.scheme}://{self.addresses['openai']}/v1"

    @property
    def console_url(self) -> str:
        """The web console (docs/console.md)."""
        return f"{self.scheme}://{self.addresses['console']}"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def client_tls(self) -> ClientTls | bool:
        """What callers pass as MeshClient(tls=...): the CA and the client certificate; False = plaintext."""
        if not self.config.tls:
            return False
        pki = LocalPki(self.tls_dir)
        return ClientTls(root_cert=str(pki.ca), client_cert=str(pki.cert("client")), client_key=str(pki.key("client")))

    def _grpc_channel(self, address: str) -> grpc.Channel:
        tls = self.client_tls
        if not isinstance(tls, ClientTls):
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, tls.credentials())

    def _tls_env(self, name: str) -> dict[str, str]:
        """MAAS_TLS_* of one component: its own certificate, the CA, whether callers need certificates."""
        if not self.config.tls:
            return {}
        pki = LocalPki(self.tls_dir)
        auth = {"router": self.config.tls_client_auth, "openai": "optional", "console": "optional"}.get(
            name, "required"
        )
        return {
            "MAAS_TLS_CERT": str(pki.cert(name)),
            "MAAS_TLS_KEY": str(pki.key(name)),
            "MAAS_TLS_CA": str(pki.ca),
            "MAAS_TLS_CLIENT_AUTH": auth,
        }

    def triton_tls_args(self) -> list[str]:
        """Triton's own mutual TLS on its gRPC port (its HTTP port, used for readiness, stays plain)."""
        if not self.config.tls:
            return []
        pki = LocalPki(self.tls_dir)
        return [
            "--grpc-use-ssl=true",
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={pki.cert('triton')}",
            f"--grpc-server-key={pki.key('triton')}",
            f"--grpc-root-cert={pki.ca}",
        ]

    def start_only_files(self) -> dict[str, tuple[Path, ...]]:
        """Components that read files at start only, and those files (certificate, key, CA): Triton's TLS
        files, which the supervisor watches to restart it on a renewal (Triton has no reload)."""
        if not self.config.tls:
            return {}
        pki = LocalPki(self.tls_dir)
        return {"triton": (pki.cert("triton"), pki.key("triton"), pki.ca)}

    @property
    def metrics_addresses(self) -> dict[str, str]:
        """host:port of every component's Prometheus endpoint (GET /metrics), Triton's included."""
        found = {name: self.addresses[f"{name}_metrics"] for name in SERVICES if f"{name}_metrics" in self.addresses}
        if self.triton is not None:
            found["triton"] = self.triton.metrics_address
        return found

    def _pick_ports(self) -> dict[str, int]:
        wanted = {name: int(self.config.ports.get(name, DEFAULT_PORTS[name])) for name in DEFAULT_PORTS}
        fixed = [p for p in wanted.values() if p]
        busy = [p for p in fixed if not _port_free(self.config.host, p)]
        if busy:
            raise MeshStartError(
                f"port(s) {', '.join(map(str, busy))} on {self.config.host} already in use — is another "
                f"mesh (or Triton) running? Stop it or choose other ports."
            )
        free = iter(free_ports(sum(1 for p in wanted.values() if not p), self.config.host))
        return {name: port or next(free) for name, port in wanted.items()}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)  # OTEL_* and MAAS_* pass through to every component
        env.pop("OTEL_SERVICE_NAME", None)  # each component names itself (maas-router, maas-registry, ...)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(self.config.env)
        return env

    def _service_command(self, name: str) -> list[str]:
        a, cfg = self.addresses, self.config
        flags = {
            "registry": [
                "--database",
                str(self.state_dir / "registry.sqlite3"),
                "--model-repository",
                str(self.state_dir / "repository"),
                "--triton",
                a["triton"],
                "--reconcile-interval",
                str(cfg.reconcile_interval),
            ],
            "tokenizer": ["--model-repository", str(Path(cfg.source_repository).resolve())],
            "vision": ["--model-repository", str(Path(cfg.source_repository).resolve())],
            "router": [
                "--registry",
                a["registry"],
                "--tokenizer",
                a["tokenizer"],
                "--vision",
                a["vision"],
                "--triton",
                a["triton"],
                "--oip-fast-listen",
                a["router_oip_fast"],
            ],
            "openai": ["--router", a["router"], "--registry", a["registry"]],
            # The console reads the router's Prometheus endpoint for its charts.
            "console": [
                "--router",
                a["router"],
                "--registry",
                a["registry"],
                "--router-metrics",
                f"http://{a['router_metrics']}/metrics",
            ],
        }[name]
        metrics_port = a[f"{name}_metrics"].rsplit(":", 1)[1]
        return [
            sys.executable,
            "-m",
            f"services.{name}",
            "--listen",
            a[name],
            "--metrics-port",
            metrics_port,
            *flags,
            *cfg.service_args.get(name, ()),
        ]

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "LocalMesh":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        if not Path(cfg.source_repository).is_dir():
            raise MeshStartError(
                f"model repository {cfg.source_repository} not found (run from the repository root, "
                f"or pass --model-repository)"
            )
        ports = self._pick_ports()
        host = cfg.host
        self.addresses = {name: f"{host}:{ports[name]}" for name in SERVICES}
        self.addresses["triton"] = f"{host}:{ports['triton_grpc']}"
        self.addresses["router_oip_fast"] = f"{host}:{ports['router_oip_fast']}"  # the router's OIP fast path
        self.addresses.update({f"{name}_metrics": f"{host}:{ports[f'{name}_metrics']}" for name in SERVICES})
        (self.state_dir / "repository").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tls:
            self.pki = LocalPki(self.tls_dir).ensure([*SERVICES, "triton"])
            self.log(f"TLS: CA and certificates in {self.tls_dir}")
        atexit.register(self.stop)

        self.log(f"starting Triton on {self.addresses['triton']}")
        env = self._env()
        tracing = triton_tracing_args(env)
        if tracing_configured(env) and not tracing:
            self.log(
                "Triton is not traced: it exports OTLP over HTTP only; set MAAS_TRITON_OTLP_HTTP_ENDPOINT "
                "(or OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
            )
        self.triton = LocalTriton(
            TritonConfig(
                model_repository=self.state_dir / "repository",
                models=(),
                host=host,
                grpc_port=ports["triton_grpc"],
                http_port=ports["triton_http"],
                metrics_port=ports["triton_metrics"],
                work_dir=self.state_dir / "triton",
                extra_args=[*tracing, *self.triton_tls_args(), *cfg.triton_extra_args],
                env={k: v for k, v in env.items() if k.startswith("OTEL_")},
                startup_timeout=cfg.startup_timeout,
            )
        )
        self.triton.start()
        for name in SERVICES:
            self.log(f"starting {name} on {self.addresses[name]}")
            self._spawn(name, env)
        for name in SERVICES:
            self._wait_serving(name)
        self.register_models()
        self._wait_routable([m.name for m in cfg.models])

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        # Each component names itself in traces (the spec's variable, so it wins everywhere).
        env = {**env, "OTEL_SERVICE_NAME": f"maas-{name}"} if tracing_configured(env) else env
        env = {**env, **self._tls_env(name)}
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.processes[name] = spawn(
                self._service_command(name),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        if name == "triton":
            return self.triton.log_tail(lines) if self.triton else "(no log)"
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check_alive(self, name: str) -> None:
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is not None:
            raise MeshStartError(
                f"{name} exited with code {proc.returncode}; log {self.log_dir / (name + '.log')}:\n"
                f"{self.log_tail(name)}"
            )

    def _poll(self, name: str, ready, what: str) -> None:
        """Until ready() is true (a gRPC error counts as not yet), failing fast if `name` exits."""
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            self._check_alive(name)
            try:
                if ready():
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise MeshStartError(
                    f"{what} after {self.config.startup_timeout:.0f}s; {name} log:\n{self.log_tail(name)}"
                )
            time.sleep(0.1)

    def _wait_serving(self, name: str) -> None:
        if name in HTTP_SERVICES:
            ca = LocalPki(self.tls_dir).ca if self.config.tls else None
            self._poll(
                name, lambda: _http_ok(f"{self.scheme}://{self.addresses[name]}/healthz", ca), f"{name} not serving"
            )
            return
        with self._grpc_channel(self.addresses[name]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            self._poll(
                name,
                lambda: (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                f"{name} not SERVING",
            )

    def register_models(self) -> None:
        """Register each source model the registry does not know yet and point `production` at it."""
        with RegistryClient(self.registry_address, timeout=30, tls=self.client_tls) as registry:
            self.registered += register_source_models(
                registry,
                Path(self.config.source_repository),
                self.config.models,
                self.config.register_timeout,
                self.log,
                registry_log=lambda: self.log_tail("registry"),
            )

    def _wait_routable(self, models: Sequence[str]) -> None:
        """Until the router has the registry's state and Triton has each model ready (OIP ModelReady)."""
        with self._grpc_channel(self.router_address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for model in models:
                self._poll(
                    "router",
                    lambda model=model: stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=2).ready,
                    f"router cannot route {model}",
                )

    def stop(self) -> None:
        """Services in reverse start order (SIGTERM, then SIGKILL after the grace), Triton last."""
        with self._lock:
            for name in reversed(SERVICES):
                self.stop_component(name)
            if self.triton is not None:
                self.triton.stop()
                self.triton = None
            atexit.unregister(self.stop)

    def stop_component(self, name: str) -> None:
        """Stop one service (tests use this to take the registry or Triton away)."""
        if name == "triton":
            if self.triton is not None:
                self.triton.stop()
            return
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.config.stop_grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart_component(self, name: str) -> None:
        """Start a stopped component again on the same address. Triton comes back empty (explicit model
        control): restart the registry after it, which re-loads every live version at start-up."""
        if name == "triton":
            if self.triton is not None and self.triton.process is None:
                self.triton.start()
            return
        if name in self.processes:
            return
        self._spawn(name, self._env())
        self._wait_serving(name)

    def revive(self, name: str) -> None:
        """Start a component that died, on the same address (the supervisor's restart)."""
        if name == "triton":
            if self.triton is not None:
                self.triton.stop()  # reaps stubs and their shared memory
                self.triton.start()
            return
        self.stop_component(name)
        self.restart_component(name)

    def exit_reason(self, name: str) -> str:
        proc = self.triton.process if name == "triton" and self.triton else self.processes.get(name)
        code = proc.poll() if proc is not None else None
        if code is None:
            return "not running"
        return f"signal {-code}" if code < 0 else f"exit code {code}"

    def wait_routable(self, models: Sequence[str] | None = None) -> None:
        self._wait_routable(models if models is not None else [m.name for m in self.config.models])

    def alive(self) -> dict[str, bool]:
        status = {name: proc.poll() is None for name, proc in self.processes.items()}
        status["triton"] = (
            self.triton is not None and self.triton.process is not None and self.triton.process.poll() is None
        )
        return status

    def rows(self) -> list[tuple[str, str, str]]:
        """(component, address, log file under log_dir) for the table `maas up` prints."""
        rows = [
            ("router — maas.v1.Router + Open Inference Protocol", self.addresses["router"], "router.log"),
            ("router — Open Inference Protocol, fast path", self.addresses["router_oip_fast"], "router.log"),
            ("registry", self.addresses["registry"], "registry.log"),
            ("tokenizer", self.addresses["tokenizer"], "tokenizer.log"),
            ("vision", self.addresses["vision"], "vision.log"),
            ("openai — OpenAI-compatible HTTP API (base_url)", self.openai_url, "openai.log"),
            ("console — web console (browser)", self.console_url, "console.log"),
        ]
        rows += [(f"{name} metrics", self.addresses[f"{name}_metrics"], "") for name in SERVICES]
        if self.triton is not None:
            rows += [
                ("triton gRPC", self.triton.grpc_address, "../triton/tritonserver.log"),
                ("triton HTTP", self.triton.http_address, ""),
                ("triton metrics", self.triton.metrics_address, ""),
            ]
        return rows

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str, ca: Path | None = None) -> bool:
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
