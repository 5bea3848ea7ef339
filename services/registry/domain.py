"""Plain domain types of the registry (no protobuf, no gRPC): what the store keeps and the servicer converts."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from services.shared.errors import InvalidArgument

# Lower-case letter first, then letters, digits, '_' or '-': no '/', '.', or '..' can ever reach a path.
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MAX_NAME_CHARS = 64


def check_name(value: str, what: str = "model name") -> str:
    """Model and alias names become directory names: the rules make path traversal impossible."""
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{what} {value[:20]!r}... is {len(value)} characters, at most {MAX_NAME_CHARS} allowed")
    if not NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use lower-case letters, digits, '_' and '-', starting with a letter"
        )
    return value


class VersionState(enum.Enum):
    REGISTERED = "registered"
    LOADING = "loading"
    READY = "ready"
    ARCHIVED = "archived"
    FAILED = "failed"


# Versions that occupy Triton (or are about to): a new version's signature must match these.
LIVE_STATES = (VersionState.REGISTERED, VersionState.LOADING, VersionState.READY)


class ArtifactFormat(enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    TRITON_FOLDER = "triton_folder"
    ORT_GENAI = "ort_genai"  # an ONNX Runtime GenAI folder: a text-generation version


class PreprocessingKind(enum.Enum):
    NONE = "none"
    TOKENIZER = "tokenizer"
    VISION = "vision"


class PostprocessingKind(enum.Enum):
    NONE = "none"
    EMBEDDING = "embedding"
    SOFTMAX_TOP_K = "softmax_top_k"
    GENERATION = "generation"  # decoupled text generation (Router.Generate)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton datatype string, e.g. "FP32"
    shape: tuple[int, ...]  # without the batch dimension; -1 = dynamic


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)

    def differences(self, other: "Signature") -> list[str]:
        """Human-readable differences from `other` (empty = compatible)."""
        out = []
        for side, mine, theirs in (("input", self.inputs, other.inputs), ("output", self.outputs, other.outputs)):
            a, b = {t.name: t for t in mine}, {t.name: t for t in theirs}
            for name in sorted(a.keys() - b.keys()):
                out.append(f"{side} {name!r} is new")
            for name in sorted(b.keys() - a.keys()):
                out.append(f"{side} {name!r} is missing")
            for name in sorted(a.keys() & b.keys()):
                if a[name].datatype != b[name].datatype:
                    out.append(f"{side} {name!r} datatype {a[name].datatype} != {b[name].datatype}")
                if a[name].shape != b[name].shape:
                    out.append(f"{side} {name!r} shape {list(a[name].shape)} != {list(b[name].shape)}")
        return out


@dataclass(frozen=True)
class Preprocessing:
    kind: PreprocessingKind = PreprocessingKind.NONE
    name: str = ""


@dataclass(frozen=True)
class Postprocessing:
    kind: PostprocessingKind = PostprocessingKind.NONE
    output: str = ""
    top_k: int = 0


@dataclass(frozen=True)
class RegistrationRequest:
    """Header of a registration, checked before any byte is stored."""

    model: str
    format: ArtifactFormat
    sha256: str
    size_bytes: int
    signature: Signature = Signature()
    preprocessing: Preprocessing = Preprocessing()
    postprocessing: Postprocessing = Postprocessing()
    labels: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    max_batch_size: int = 0
    actor: str = ""
    description: str = ""


@dataclass
class Version:
    model: str
    version: int
    state: VersionState
    format: ArtifactFormat
    sha256: str
    size_bytes: int
    signature: Signature
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    labels: tuple[str, ...]
    tags: dict[str, str]
    created_at: float
    created_by: str
    description: str
    max_batch_size: int
    state_reason: str = ""
    load_ms: float = 0.0
    aliases: tuple[str, ...] = ()
    # For TRITON_FOLDER uploads: the uploaded config (JSON) the generated one is based on; for
    # ORT_GENAI ones the generation config the registry derived from genai_config.json.
    base_config: str = ""


@dataclass(frozen=True)
class Alias:
    model: str
    name: str
    version: int
    previous_version: int
    updated_by: str
    updated_at: float
    reason: str


@dataclass(frozen=True)
class Target:
    """A traffic target: exactly one of version / alias."""

    version: int = 0
    alias: str = ""
    weight: int = 0

    def describe(self) -> str:
        return f"alias {self.alias!r}" if self.alias else f"version {self.version}"


@dataclass(frozen=True)
class TrafficPolicy:
    model: str
    split: tuple[Target, ...] = ()
    shadow: Target | None = None
    shadow_fraction: float = 0.0
    updated_by: str = ""
    updated_at: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class ShadowStats:
    primary_version: int
    shadow_version: int
    samples: int  # compared requests
    top1_agreement: float
    mean_cosine: float
    primary_latency_ms: float
    shadow_latency_ms: float


@dataclass(frozen=True)
class ShadowResult:
    model: str
    primary_version: int
    shadow_version: int
    items: int
    top1_agreed: int
    cosine_sum: float
    primary_latency_ms: float
    shadow_latency_ms: float
    # For the shadow report (shadow_report.py): top-5 overlap, per-item cosines, the caller's request id.
    top5_overlap_sum: float = 0.0
    cosines: tuple[float, ...] = ()
    request_id: str = ""
    # Generation (shadow_report.py): tokens compared (the longer sequence) and their common prefix.
    generated_tokens: int = 0
    prefix_tokens: int = 0


@dataclass
class Model:
    name: str
    versions: list[Version]
    aliases: list[Alias]
    policy: TrafficPolicy
    shadow_stats: list[ShadowStats] = field(default_factory=list)
    alias_history: list[Alias] = field(default_factory=list)


@dataclass
class ModelRouting:
    """What the router needs for one model."""

    model: str
    versions: list[Version]
    aliases: dict[str, int]
    policy: TrafficPolicy


@dataclass(frozen=True)
class WatchEvent:
    revision: int
    snapshot: list[ModelRouting] | None = None
    changed: ModelRouting | None = None
    rollout: object | None = None  # a rollout.Rollout (rollout_changed)
