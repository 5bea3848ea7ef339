"""The routing table and version choice: explicit version > alias > traffic policy > default.

Plain Python, no gRPC: the watcher fills the table from the registry's Watch stream, the data plane
asks it which version answers a request. Each model's view is replaced whole on every change, so a
request always sees one consistent view.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from services.shared.errors import FailedPrecondition, NotFound, Unavailable

DEFAULT_ALIAS = "production"


class ServingState(enum.IntEnum):
    """A version's state as the router serves it (mirrors maas.v1.VersionState, the registry's)."""

    UNSPECIFIED = 0
    REGISTERED = 1
    LOADING = 2
    READY = 3
    ARCHIVED = 4
    FAILED = 5


class PreKind(enum.IntEnum):
    """Mirrors maas.v1.Preprocessing.Kind."""

    UNSPECIFIED = 0
    NONE = 1
    TOKENIZER = 2
    VISION = 3


class PostKind(enum.IntEnum):
    """Mirrors maas.v1.Postprocessing.Kind."""

    UNSPECIFIED = 0
    NONE = 1
    EMBEDDING = 2
    SOFTMAX_TOP_K = 3
    GENERATION = 4


class RouteKind(enum.IntEnum):
    """Mirrors maas.v1.RouteKind."""

    UNSPECIFIED = 0
    EXPLICIT_VERSION = 1
    ALIAS = 2
    TRAFFIC_POLICY = 3
    DEFAULT = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class VersionInfo:
    """What the router needs to run one version: where it lives and its pipeline."""

    model: str
    version: int
    state: ServingState = ServingState.READY
    state_reason: str = ""
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    pre_kind: PreKind = PreKind.NONE
    pre_name: str = ""
    post_kind: PostKind = PostKind.NONE
    post_output: str = ""
    top_k: int = 0
    labels: tuple[str, ...] = ()
    # Input limits the signature cannot express, declared by version tags (0 = unknown; see signature.py).
    max_sequence_length: int = 0
    vocab_size: int = 0

    @property
    def ready(self) -> bool:
        return self.state == ServingState.READY

    @property
    def triton_model(self) -> str:
        # The registry loads version N of a model as Triton model <name>, version N.
        return self.model

    @property
    def triton_version(self) -> str:
        return str(self.version)

    @property
    def output_name(self) -> str:
        """The output post-processing reads: the configured one, else the first of the signature."""
        if self.post_output:
            return self.post_output
        return self.outputs[0].name if self.outputs else ""


@dataclass(frozen=True)
class Target:
    """A traffic-policy target: a version number or an alias name, with a relative weight."""

    version: int = 0
    alias: str = ""
    weight: int = 0

    def describe(self) -> str:
        return self.alias or f"v{self.version}"


@dataclass(frozen=True)
class Shadow:
    target: Target
    fraction: float


@dataclass(frozen=True)
class ModelRoutes:
    """The routing view of one model (one WatchEvent.model_changed)."""

    name: str
    versions: dict[int, VersionInfo] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    split: tuple[Target, ...] = ()
    shadow: Shadow | None = None

    def ready_versions(self) -> list[int]:
        return sorted(v for v, info in self.versions.items() if info.ready)


@dataclass(frozen=True)
class Route:
    """The answer of the table: which version serves, why, and where a shadow copy goes (if any)."""

    info: VersionInfo
    kind: RouteKind
    target: str = ""
    shadow: VersionInfo | None = None


# The draw's parameters (protos/maas/v1/fastpath.proto SplitDraw: the fast path gets them in its
# snapshot). Steps: fractional parts of the golden ratio and of sqrt(2), the best-spread additive sequences.
_STEPS = {"split": 0.6180339887498949, "shadow": 0.4142135623730951}
SPLIT_SALT = "split"
SPLIT_STEP = _STEPS[SPLIT_SALT]
KEY_SEPARATOR = "\x00"
KEY_DIGEST_BYTES = 8  # BLAKE2b with an 8-byte digest


def unit_interval(*parts: str) -> float:
    """A stable draw in [0, 1) from the given strings (same key → same number, on every replica)."""
    digest = hashlib.blake2b(KEY_SEPARATOR.join(parts).encode(), digest_size=KEY_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def next_point(previous: float, step: float) -> float:
    """The key-less sequence's next point (previous in [0, 1))."""
    return (previous + step) % 1.0


def weighted_choice(weights: list[int], point: float) -> int:
    """The index a draw in [0, 1) picks among targets of these weights (the last one on rounding)."""
    rest = point * sum(weights)
    for index, weight in enumerate(weights):
        rest -= weight
        if rest < 0:
            return index
    return len(weights) - 1


class RoutingTable:
    """Models by name, replaced whole as the registry reports changes."""

    def __init__(self, rng: random.Random | None = None):
        self._models: dict[str, ModelRoutes] = {}
        self._rng = rng or random.Random()
        self._sequence: dict[tuple[str, str], float] = {}
        self.revision = 0
        self.has_state = False
        # Called after every change (the compiled OIP fast path mirrors the table).
        self.listeners: list[Callable[[], None]] = []

    # -- updates (from the watcher) ----------------------------------------------------------------
    def replace_all(self, models: list[ModelRoutes], revision: int) -> None:
        self._models = {m.name: m for m in models}
        self.revision = revision
        self.has_state = True
        self._changed()

    def update(self, model: ModelRoutes, revision: int) -> None:
        if revision and revision <= self.revision:
            return  # stale or duplicate event
        self._models = {**self._models, model.name: model}
        self.revision = revision
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    # -- reads -------------------------------------------------------------------------------------
    def models(self) -> list[ModelRoutes]:
        return list(self._models.values())

    def ready_versions(self) -> set[tuple[str, str]]:
        """(Triton model, Triton version) of every READY version: what a new Triton replica must serve
        before the router sends it calls (the registry loads them there)."""
        return {
            (info.triton_model, info.triton_version)
            for routes in self._models.values()
            for info in routes.versions.values()
            if info.ready
        }

    def model(self, name: str) -> ModelRoutes:
        if not self.has_state:
            raise Unavailable("routing state not received from the registry yet; retry shortly")
        routes = self._models.get(name)
        if routes is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise UnknownModel(name, f"model {name!r} is not registered (registered models: {known})")
        return routes

    def resolve(self, name: str, version: int = 0, alias: str = "", routing_key: str = "") -> Route:
        """Pick the version for a request: explicit version > alias > traffic policy > default."""
        routes = self.model(name)
        if version:
            info, kind, target = (
                _must_be_ready(routes, version, f"version {version}"),
                RouteKind.EXPLICIT_VERSION,
                f"v{version}",
            )
        elif alias:
            info, kind, target = _resolve_alias(routes, alias), RouteKind.ALIAS, alias
        elif routes.split:
            info, picked = self._pick_split(routes, routing_key)
            kind, target = RouteKind.TRAFFIC_POLICY, picked.describe()
        else:
            info, target = default_version(routes)
            kind = RouteKind.DEFAULT
        shadow = self._shadow(routes, routing_key)
        if shadow is not None and shadow.version == info.version:
            shadow = None  # mirroring a version onto itself compares nothing
        return Route(info, kind, target, shadow)

    def default(self, name: str) -> VersionInfo:
        """The version answering when nothing is asked for and no draw is wanted (metadata, readiness)."""
        return default_version(self.model(name))[0]

    def version(self, name: str, version: int) -> VersionInfo:
        """A version whatever its state (NOT_FOUND if unknown)."""
        routes = self.model(name)
        info = routes.versions.get(version)
        if info is None:
            raise UnknownVersion(
                name, version, f"model {name!r} has no version {version} (versions: {sorted(routes.versions)})"
            )
        return info

    # -- internals ---------------------------------------------------------------------------------
    def _draw(self, routes: ModelRoutes, routing_key: str, salt: str) -> float:
        if routing_key:
            return unit_interval(routes.name, salt, routing_key)
        # No key: a low-discrepancy sequence (additive recurrence by an irrational step) from a random
        # start, so any run of requests splits almost exactly by weight — a 10% canary gets 10%, not
        # 10% ± binomial noise — while replicas, starting elsewhere, do not move in lockstep. Split and
        # shadow use different steps so their decisions are not correlated.
        key = (routes.name, salt)
        point = self._sequence.get(key)
        if point is None:
            point = self._rng.random()
        point = next_point(point, _STEPS[salt])
        self._sequence[key] = point
        return point

    def _pick_split(self, routes: ModelRoutes, routing_key: str) -> tuple[VersionInfo, Target]:
        usable = usable_split(routes)
        if not usable:
            described = ", ".join(f"{t.describe()}={t.weight}" for t in routes.split)
            raise FailedPrecondition(f"model {routes.name!r}: no READY version in its traffic policy ({described})")
        point = self._draw(routes, routing_key, SPLIT_SALT)
        return usable[weighted_choice([target.weight for _, target in usable], point)]

    def _shadow(self, routes: ModelRoutes, routing_key: str) -> VersionInfo | None:
        shadow = routes.shadow
        if shadow is None or shadow.fraction <= 0:
            return None
        info = _target_version(routes, shadow.target)
        if info is None or not info.ready:
            return None
        if self._draw(routes, routing_key, "shadow") >= shadow.fraction:
            return None
        return info


class UnknownModel(NotFound):
    def __init__(self, model: str, message: str):
        super().__init__(message)
        self.triton_wording = f"Request for unknown model: '{model}' is not found"


class UnknownVersion(NotFound):
    def __init__(self, model: str, version: int, message: str):
        super().__init__(message)
        self.triton_wording = f"Request for unknown model: '{model}' version {version} is not found"


class VersionNotReady(FailedPrecondition):
    def __init__(self, model: str, version: int, message: str):
        super().__init__(message)
        self.triton_wording = f"Request for unknown model: '{model}' version {version} is not at ready state"


class NoReadyVersion(FailedPrecondition):
    def __init__(self, model: str, message: str):
        super().__init__(message)
        self.triton_wording = f"Request for unknown model: '{model}' has no available versions"


def usable_split(routes: ModelRoutes) -> list[tuple[VersionInfo, Target]]:
    """The traffic policy's targets that get traffic: those resolving to a READY version, by weight."""
    usable = []
    for target in routes.split:
        info = _target_version(routes, target)
        if target.weight > 0 and info is not None and info.ready:
            usable.append((info, target))
    return usable


def ready_aliases(routes: ModelRoutes) -> dict[str, int]:
    """Aliases that point at a READY version (the others give FAILED_PRECONDITION or NOT_FOUND)."""
    return {alias: v for alias, v in routes.aliases.items() if v in routes.versions and routes.versions[v].ready}


def _target_version(routes: ModelRoutes, target: Target) -> VersionInfo | None:
    number = routes.aliases.get(target.alias) if target.alias else target.version
    return routes.versions.get(number) if number else None


def _must_be_ready(routes: ModelRoutes, version: int, what: str) -> VersionInfo:
    info = routes.versions.get(version)
    if info is None:
        raise UnknownVersion(
            routes.name, version, f"model {routes.name!r} has no {what} (versions: {sorted(routes.versions)})"
        )
    if not info.ready:
        reason = f": {info.state_reason}" if info.state_reason else ""
        raise VersionNotReady(
            routes.name, version, f"model {routes.name!r} {what} is {info.state.name}, not READY{reason}"
        )
    return info


def _resolve_alias(routes: ModelRoutes, alias: str) -> VersionInfo:
    version = routes.aliases.get(alias)
    if version is None:
        known = ", ".join(sorted(routes.aliases)) or "none"
        raise NotFound(f"model {routes.name!r} has no alias {alias!r} (aliases: {known})")
    return _must_be_ready(routes, version, f"version {version} (alias {alias!r})")


def default_version(routes: ModelRoutes) -> tuple[VersionInfo, str]:
    """The "production" alias when it points at a READY version, else the newest READY version."""
    production = routes.aliases.get(DEFAULT_ALIAS)
    if production is not None and production in routes.versions and routes.versions[production].ready:
        return routes.versions[production], DEFAULT_ALIAS
    ready = routes.ready_versions()
    if not ready:
        states = ", ".join(f"v{v}={i.state.name}" for v, i in sorted(routes.versions.items())) or "no versions"
        raise NoReadyVersion(routes.name, f"model {routes.name!r} has no READY version ({states})")
    return routes.versions[ready[-1]], f"v{ready[-1]}"
