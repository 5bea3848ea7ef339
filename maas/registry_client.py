"""A small client over the registry's gRPC API, shared by the `maas models` CLI, `maas up` and the kubectl plugin.

    with RegistryClient("127.0.0.1:50052", token=os.environ.get("MAAS_ADMIN_TOKEN")) as registry:
        v = registry.register("model.onnx", "minilm", preprocessing=("tokenizer", "minilm"),
                              postprocessing=("embedding", ""), progress=lambda sent, total: ...)
        registry.wait_ready("minilm", v.version)
        registry.set_alias("minilm", "production", v.version, reason="first release")

Returns the API's protobuf messages. Every failure is a RegistryError carrying the server's status and message.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grpc

from maas.auth import bearer
from maas import ports
from maas.tls import ClientTls, open_channel
from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc

DEFAULT_ADDRESS = ports.loopback(ports.REGISTRY)
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

FORMATS = {
    "onnx": pb.ARTIFACT_FORMAT_ONNX,
    "torchscript": pb.ARTIFACT_FORMAT_TORCHSCRIPT,
    "triton": pb.ARTIFACT_FORMAT_TRITON_FOLDER,
    "genai": pb.ARTIFACT_FORMAT_ORT_GENAI,
}
PREPROCESSING = {
    "none": pb.Preprocessing.KIND_NONE,
    "tokenizer": pb.Preprocessing.KIND_TOKENIZER,
    "vision": pb.Preprocessing.KIND_VISION,
}
POSTPROCESSING = {
    "none": pb.Postprocessing.KIND_NONE,
    "embedding": pb.Postprocessing.KIND_EMBEDDING,
    "softmax_top_k": pb.Postprocessing.KIND_SOFTMAX_TOP_K,
    "generation": pb.Postprocessing.KIND_GENERATION,
}
STATE_NAMES = {v: pb.VersionState.Name(v).removeprefix("VERSION_STATE_").lower() for v in pb.VersionState.values()}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}

Progress = Callable[[int, int], None]  # (bytes sent, total bytes)


class RegistryError(Exception):
    """A failed registry call: `code` is the gRPC status, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        raise RegistryError(exc.code(), exc.details() or exc.code().name) from None


def default_address() -> str:
    return os.environ.get("MAAS_REGISTRY_ADDRESS") or DEFAULT_ADDRESS


def default_actor() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def detect_format(path: Path) -> str:
    """onnx / torchscript / triton / genai from the path (a folder with genai_config.json is an ONNX Runtime
    GenAI model; another folder or a .tar.gz is a packed Triton model folder)."""
    name = path.name.lower()
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "genai"
    if path.is_dir() or name.endswith((".tar.gz", ".tgz")):
        return "triton"
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith((".pt", ".pth", ".torchscript", ".ts")):
        return "torchscript"
    raise ValueError(f"cannot tell the format of {path}; pass format= onnx, torchscript or triton")


def pack_folder(folder: Path, dest: Path, genai: bool = False) -> Path:
    """A Triton model folder (config.pbtxt + one numbered version folder) as a .tar.gz, or an ONNX Runtime
    GenAI folder as a plain .tar (its weights do not compress; gzip would only cost time)."""
    marker = "genai_config.json" if genai else "config.pbtxt"
    if not (folder / marker).is_file():
        kind = "an ONNX Runtime GenAI folder" if genai else "a Triton model folder"
        raise ValueError(f"{folder} has no {marker}; {kind} is expected")
    with tarfile.open(dest, "w" if genai else "w:gz") as tar:
        for item in sorted(folder.rglob("*")):
            if item.is_symlink():
                raise ValueError(f"{item}: symbolic links cannot be uploaded")
            tar.add(item, arcname=str(item.relative_to(folder)), recursive=False)
    return dest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def parse_tensor(spec: str) -> pb.TensorSpec:
    """NAME:DATATYPE:DIMS, e.g. INPUT__0:FP32:3,224,224 (dims without the batch dimension; -1 = dynamic)."""
    try:
        name, datatype, dims = spec.split(":")
        shape = [int(d) for d in dims.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"tensor {spec!r} must be NAME:DATATYPE:DIMS, e.g. INPUT__0:FP32:3,224,224") from None
    return pb.TensorSpec(name=name, datatype=datatype.upper(), shape=shape)


def parse_target(text: str, weight: int = 0) -> pb.TrafficTarget:
    """'3' or 'v3' is a version, anything else an alias."""
    raw = text[1:] if text[:1] in ("v", "V") and text[1:].isdigit() else text
    if raw.isdigit():
        return pb.TrafficTarget(version=int(raw), weight=weight)
    return pb.TrafficTarget(alias=text, weight=weight)


def target_name(t: pb.TrafficTarget) -> str:
    return t.alias if t.WhichOneof("target") == "alias" else f"v{t.version}"


class RegistryClient:
    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        actor: str | None = None,
        channel: grpc.Channel | None = None,
        tls: ClientTls | bool | None = None,
    ):
        """tls: ClientTls, None = from MAAS_TLS_* in the environment (maas/tls.py), False = plaintext."""
        self.address = address or default_address()
        self.timeout = timeout
        self.actor = actor or default_actor()
        token = token if token is not None else os.environ.get("MAAS_ADMIN_TOKEN")
        self._metadata = bearer(token)
        self._channel = channel or open_channel(
            self.address,
            [
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
            tls,
        )
        self.stub = registry_pb2_grpc.RegistryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- registration ------------------------------------------------------------------------------
    def register(
        self,
        path: str | os.PathLike,
        model: str,
        *,
        format: str | None = None,
        inputs: Sequence[pb.TensorSpec] = (),
        outputs: Sequence[pb.TensorSpec] = (),
        preprocessing: tuple[str, str] = ("none", ""),
        postprocessing: tuple[str, str] = ("none", ""),
        top_k: int = 0,
        labels: Sequence[str] = (),
        tags: dict[str, str] | None = None,
        max_batch_size: int = 0,
        description: str = "",
        progress: Progress | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        timeout: float | None = None,
    ) -> pb.ModelVersion:
        """Upload a version (ONNX / TorchScript file, Triton folder or its .tar.gz) in chunks.
        Returns it as registered; it loads in the background (see wait_ready)."""
        path = Path(path)
        fmt = format or detect_format(path)
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
        with tempfile.TemporaryDirectory(prefix="maas-upload-") as tmp:
            if path.is_dir():
                genai = fmt == "genai"
                path = pack_folder(path, Path(tmp) / ("model.tar" if genai else "model.tar.gz"), genai=genai)
            size = path.stat().st_size
            header = pb.RegistrationHeader(
                model=model,
                format=FORMATS[fmt],
                sha256=sha256_file(path),
                size_bytes=size,
                signature=pb.Signature(inputs=list(inputs), outputs=list(outputs)),
                preprocessing=pb.Preprocessing(kind=PREPROCESSING[preprocessing[0]], name=preprocessing[1]),
                postprocessing=pb.Postprocessing(
                    kind=POSTPROCESSING[postprocessing[0]], output=postprocessing[1], top_k=top_k
                ),
                labels=list(labels),
                tags=tags or {},
                max_batch_size=max_batch_size,
                actor=self.actor,
                description=description,
            )

            def messages() -> Iterator[pb.RegisterVersionRequest]:
                yield pb.RegisterVersionRequest(header=header)
                sent = 0
                if progress:
                    progress(0, size)
                with open(path, "rb") as f:
                    while chunk := f.read(chunk_bytes):
                        yield pb.RegisterVersionRequest(chunk=chunk)
                        sent += len(chunk)
                        if progress:
                            progress(sent, size)

            return _call(
                self.stub.RegisterVersion,
                messages(),
                metadata=self._metadata,
                timeout=timeout or max(self.timeout, 600.0),
            )

    def wait_ready(self, model: str, version: int, timeout: float = 600.0, poll: float = 0.2) -> pb.ModelVersion:
        """Poll until the version is READY; RegistryError(FAILED_PRECONDITION) if it failed or was archived."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.get_version(model, version)
            if v.state == pb.VERSION_STATE_READY:
                return v
            if v.state in (pb.VERSION_STATE_FAILED, pb.VERSION_STATE_ARCHIVED):
                raise RegistryError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"version {version} of {model} is {STATE_NAMES[v.state]}: {v.state_reason}",
                )
            if time.monotonic() > deadline:
                raise RegistryError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"version {version} of {model} not ready after {timeout:.0f}s (state {STATE_NAMES[v.state]})",
                )
            time.sleep(poll)

    # -- reads -------------------------------------------------------------------------------------
    def list_models(self, include_archived: bool = False) -> list[pb.Model]:
        return list(
            _call(
                self.stub.ListModels, pb.ListModelsRequest(include_archived=include_archived), timeout=self.timeout
            ).models
        )

    def get_model(self, model: str) -> pb.Model:
        return _call(self.stub.GetModel, pb.GetModelRequest(model=model), timeout=self.timeout)

    def get_version(self, model: str, version: int) -> pb.ModelVersion:
        return _call(self.stub.GetVersion, pb.GetVersionRequest(model=model, version=version), timeout=self.timeout)

    def watch(self) -> Iterator[pb.WatchEvent]:
        """The routing snapshot, then every change, until the caller stops iterating."""
        stream = self.stub.Watch(pb.WatchRequest())
        try:
            for event in stream:
                yield event
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise RegistryError(exc.code(), exc.details() or exc.code().name) from None
        finally:
            stream.cancel()

    # -- mutations ---------------------------------------------------------------------------------
    def set_alias(self, model: str, alias: str, version: int, reason: str = "") -> pb.Alias:
        return _call(
            self.stub.SetAlias,
            pb.SetAliasRequest(model=model, alias=alias, version=version, reason=reason, actor=self.actor),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def set_traffic(
        self,
        model: str,
        split: Iterable[pb.TrafficTarget] = (),
        shadow: pb.TrafficTarget | None = None,
        shadow_fraction: float = 0.0,
        reason: str = "",
    ) -> pb.TrafficPolicy:
        request = pb.SetTrafficPolicyRequest(model=model, split=list(split), reason=reason, actor=self.actor)
        if shadow is not None:
            request.shadow.CopyFrom(pb.ShadowPolicy(target=shadow, fraction=shadow_fraction))
        return _call(self.stub.SetTrafficPolicy, request, metadata=self._metadata, timeout=self.timeout)

    def rollback(self, model: str, alias: str = "production", reason: str = "") -> pb.Alias:
        return _call(
            self.stub.Rollback,
            pb.RollbackRequest(model=model, alias=alias, reason=reason, actor=self.actor),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def archive(self, model: str, version: int, reason: str = "") -> pb.ModelVersion:
        return _call(
            self.stub.ArchiveVersion,
            pb.ArchiveVersionRequest(model=model, version=version, reason=reason, actor=self.actor),
            metadata=self._metadata,
            timeout=max(self.timeout, 300.0),
        )

    def report_shadow_results(self, results: Iterable[pb.ShadowResult]) -> None:
        _call(
            self.stub.ReportShadowResults,
            pb.ReportShadowResultsRequest(results=list(results)),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    # -- progressive delivery (docs/rollouts.md) ---------------------------------------------------
    def start_rollout(
        self, model: str, version: int, policy: pb.RolloutPolicy | None = None, dry_run: bool = False, reason: str = ""
    ) -> pb.Rollout:
        return _call(
            self.stub.StartRollout,
            pb.StartRolloutRequest(
                model=model,
                version=version,
                policy=policy or pb.RolloutPolicy(),
                dry_run=dry_run,
                reason=reason,
                actor=self.actor,
            ),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def get_rollout(self, model: str) -> pb.Rollout:
        return _call(self.stub.GetRollout, pb.GetRolloutRequest(model=model), timeout=self.timeout)

    def list_rollouts(self) -> list[pb.Rollout]:
        return list(_call(self.stub.ListRollouts, pb.ListRolloutsRequest(), timeout=self.timeout).rollouts)

    def abort_rollout(self, model: str, reason: str = "") -> pb.Rollout:
        return _call(
            self.stub.AbortRollout,
            pb.AbortRolloutRequest(model=model, reason=reason, actor=self.actor),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def report_version_stats(self, stats: Iterable[pb.VersionStats]) -> None:
        _call(
            self.stub.ReportVersionStats,
            pb.ReportVersionStatsRequest(stats=list(stats)),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def compare(self, model: str, a: int, b: int) -> pb.ShadowReport:
        """Shadow agreement report of version b (shadow) against version a (primary)."""
        return _call(self.stub.CompareVersions, pb.CompareVersionsRequest(model=model, a=a, b=b), timeout=self.timeout)

    def optimize(
        self,
        model: str,
        from_version: int,
        int8: bool = True,
        policy: pb.RolloutPolicy | None = None,
        reason: str = "",
        fp16: bool = False,
        int4: bool = False,
        calibration: bytes = b"",
    ) -> pb.OptimizeVersionResponse:
        """A new int8 (or fp16: fp16=True, int8=False) version of an ONNX version, or an int4 version of a
        generation version (int4=True, int8=False), registered, READY and rolled out behind gates.
        `calibration`: a .npy of model inputs for static int8 (required for image classifiers)."""
        return _call(
            self.stub.OptimizeVersion,
            pb.OptimizeVersionRequest(
                model=model,
                from_version=from_version,
                int8=int8,
                fp16=fp16,
                int4=int4,
                calibration=calibration,
                policy=policy or pb.RolloutPolicy(),
                reason=reason,
                actor=self.actor,
            ),
            metadata=self._metadata,
            timeout=max(self.timeout, 900.0),
        )

    # -- tenants (admin token) ---------------------------------------------------------------------
    def create_tenant(
        self,
        name: str,
        allowed_models: Sequence[str] = (),
        quota: pb.Quota | None = None,
        priority: str = "standard",
        description: str = "",
        reason: str = "",
    ) -> pb.TenantKey:
        """The tenant and its API key: the only time the key is sent (the registry keeps its sha256)."""
        request = pb.CreateTenantRequest(
            name=name,
            allowed_models=list(allowed_models),
            quota=quota or pb.Quota(),
            priority=priority_value(priority),  # type: ignore[arg-type]  # protoc .pyi enums
            description=description,
            reason=reason,
            actor=self.actor,
        )
        return _call(self.stub.CreateTenant, request, metadata=self._metadata, timeout=self.timeout)

    def list_tenants(self, include_revoked: bool = True) -> list[pb.Tenant]:
        return list(
            _call(
                self.stub.ListTenants,
                pb.ListTenantsRequest(include_revoked=include_revoked),
                metadata=self._metadata,
                timeout=self.timeout,
            ).tenants
        )

    def rotate_tenant_key(self, name: str, reason: str = "") -> pb.TenantKey:
        return _call(
            self.stub.RotateTenantKey,
            pb.RotateTenantKeyRequest(name=name, reason=reason, actor=self.actor),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def revoke_tenant(self, name: str, reason: str = "") -> pb.Tenant:
        return _call(
            self.stub.RevokeTenant,
            pb.RevokeTenantRequest(name=name, reason=reason, actor=self.actor),
            metadata=self._metadata,
            timeout=self.timeout,
        )

    def set_tenant_quota(
        self,
        name: str,
        quota: pb.Quota,
        priority: str | None = None,
        allowed_models: Sequence[str] | None = None,
        reason: str = "",
    ) -> pb.Tenant:
        request = pb.SetTenantQuotaRequest(
            name=name,
            quota=quota,
            reason=reason,
            actor=self.actor,
            priority=priority_value(priority) if priority else pb.PRIORITY_UNSPECIFIED,  # type: ignore[arg-type]
            set_allowed_models=allowed_models is not None,
            allowed_models=list(allowed_models or ()),
        )
        return _call(self.stub.SetTenantQuota, request, metadata=self._metadata, timeout=self.timeout)

    def audit(self, limit: int = 100, target_prefix: str = "") -> list[pb.AuditEntry]:
        return list(
            _call(
                self.stub.ListAudit,
                pb.ListAuditRequest(limit=limit, target_prefix=target_prefix),
                metadata=self._metadata,
                timeout=self.timeout,
            ).entries
        )


PRIORITY_NAMES = {
    pb.PRIORITY_CRITICAL: "critical",
    pb.PRIORITY_STANDARD: "standard",
    pb.PRIORITY_SHEDDABLE: "sheddable",
    pb.PRIORITY_UNSPECIFIED: "standard",
}


def priority_value(name: str) -> int:
    for value, known in PRIORITY_NAMES.items():
        if known == name.lower() and value != pb.PRIORITY_UNSPECIFIED:
            return value
    raise ValueError(f"priority {name!r} is not one of critical, standard, sheddable")
